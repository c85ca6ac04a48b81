//! Black swans, best-of-k, intervals and the per-epoch spread of one sweep's scores.

use super::{Moments, Summary, quantile, sorted};
use crate::metric::Direction;
use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, StudentsT};

/// A robust z-score beyond this flags a black swan (Iglewicz and Hoaglin's 3.5).
pub const ROBUST_Z_LIMIT: f64 = 3.5;
/// A classic z-score beyond this flags a black swan.
pub const Z_LIMIT: f64 = 3.0;
/// 0.6745 = the normal distribution's third quartile: makes the MAD comparable to a std.
const MAD_SCALE: f64 = 0.674_489_750_196_081_7;

/// A seed whose score is far from the rest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlackSwan {
    pub seed: i64,
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub score: f64,
    /// (score - mean) / std.
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub z: f64,
    /// 0.6745 (score - median) / MAD; absent when the MAD is 0 (most scores equal).
    pub robust_z: Option<f64>,
    pub side: Side,
    /// On the score's better side (high when higher is better): a lucky seed, the kind a
    /// state-of-the-art claim can hide behind.
    pub lucky: bool,
    /// Which criteria flag it.
    pub flagged_by: Vec<Flag>,
}

/// Which side of the centre a black swan lies on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    High,
    Low,
}

/// A criterion that flags a black swan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flag {
    /// |robust z| > [`ROBUST_Z_LIMIT`].
    Robust,
    /// |z| > [`Z_LIMIT`].
    Z,
}

/// How an interval was computed: every interval in a document names its method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Student's t interval of a mean.
    StudentT,
    /// Bonett's (2006) interval of a standard deviation: the chi-square interval's log-scale
    /// form with the sample's kurtosis in place of the normal's, so it holds off the normal.
    Bonett,
    /// The chi-square interval of a variance component (Satterthwaite's degrees of freedom).
    ChiSquare,
    /// Welch's t interval of a difference of means.
    WelchT,
    /// The Clopper-Pearson (exact binomial) interval of a proportion.
    ClopperPearson,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::High => "high",
            Side::Low => "low",
        }
    }
}

impl Flag {
    pub fn as_str(self) -> &'static str {
        match self {
            Flag::Robust => "robust",
            Flag::Z => "z",
        }
    }
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::StudentT => "student-t",
            Method::Bonett => "bonett",
            Method::ChiSquare => "chi-square",
            Method::WelchT => "welch-t",
            Method::ClopperPearson => "clopper-pearson",
        }
    }
}

/// `flagged_by` as the report and the proto write it: the criteria's names, comma-separated.
pub fn flags(flagged_by: &[Flag]) -> Vec<&'static str> {
    flagged_by.iter().map(|f| f.as_str()).collect()
}

/// The median and the median absolute deviation of sorted scores.
pub fn median_mad(sorted: &[f64]) -> (f64, f64) {
    let median = quantile(sorted, 0.5);
    // The deviations below the median grow leftwards, those above it rightwards: merging the
    // two runs sorts them in O(n).
    let split = sorted.partition_point(|&x| x < median);
    let (mut left, mut right) = (split, split);
    let mut deviations = Vec::with_capacity(sorted.len());
    while left > 0 || right < sorted.len() {
        let l = (left > 0).then(|| median - sorted[left - 1]);
        let r = (right < sorted.len()).then(|| sorted[right] - median);
        match (l, r) {
            (Some(l), Some(r)) if l <= r => {
                deviations.push(l);
                left -= 1;
            }
            (Some(l), None) => {
                deviations.push(l);
                left -= 1;
            }
            (_, Some(r)) => {
                deviations.push(r);
                right += 1;
            }
            (None, None) => unreachable!("the loop condition"),
        }
    }
    (median, quantile(&deviations, 0.5))
}

/// Where a sweep's scores sit: what a black swan is far from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Centre {
    pub mean: f64,
    pub std: f64,
    pub median: f64,
    pub mad: f64,
}

impl Centre {
    pub fn of(summary: &Summary, mad: f64) -> Centre {
        Centre {
            mean: summary.mean,
            std: summary.std,
            median: summary.median,
            mad,
        }
    }
}

/// Whether `score` is a black swan among scores centred at `c`.
pub fn judge(seed: i64, score: f64, c: &Centre, direction: Direction) -> Option<BlackSwan> {
    let z = if c.std > 0.0 {
        (score - c.mean) / c.std
    } else {
        0.0
    };
    let robust_z = (c.mad > 0.0).then(|| MAD_SCALE * (score - c.median) / c.mad);
    let mut flagged_by = Vec::new();
    if robust_z.is_some_and(|r| r.abs() > ROBUST_Z_LIMIT) {
        flagged_by.push(Flag::Robust);
    }
    if z.abs() > Z_LIMIT {
        flagged_by.push(Flag::Z);
    }
    let side = if score >= c.median {
        Side::High
    } else {
        Side::Low
    };
    (!flagged_by.is_empty()).then_some(BlackSwan {
        seed,
        score,
        z,
        robust_z,
        side,
        lucky: side == direction.better_side(),
        flagged_by,
    })
}

/// Every black swan of a sweep, the farthest first.
pub fn black_swans(
    scores: &[(i64, f64)],
    summary: &Summary,
    mad: f64,
    direction: Direction,
) -> Vec<BlackSwan> {
    let centre = Centre::of(summary, mad);
    let mut swans: Vec<BlackSwan> = scores
        .iter()
        .filter_map(|&(seed, x)| judge(seed, x, &centre, direction))
        .collect();
    swans.sort_by(|a, b| b.z.abs().total_cmp(&a.z.abs()).then(a.seed.cmp(&b.seed)));
    swans
}

/// What a researcher who runs k seeds and reports the best (or the worst) can expect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestOfK {
    pub k: usize,
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub expected_max: f64,
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub expected_min: f64,
    /// How much better than the mean the best of k seeds looks: expected_max - mean, or
    /// mean - expected_min when lower is better. The inflation of a best-of-k claim.
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub inflation: f64,
}

impl BestOfK {
    /// The expected best and worst of k seeds, for a metric that improves in `direction`.
    pub fn best_worst(&self, direction: Direction) -> (f64, f64) {
        direction.best_worst(self.expected_min, self.expected_max)
    }
}

/// The expected best and worst of k seeds drawn without replacement from the observed ones,
/// exactly: with scores sorted ascending, E[max] = sum over i >= k of x_(i) C(i-1, k-1) / C(n, k).
/// The weights are built by their ratio from the top down, so no binomial overflows. O(n) per k.
/// `direction` says which of the two is the best.
pub fn best_of_k(sorted: &[f64], k: usize, direction: Direction) -> BestOfK {
    let n = sorted.len();
    assert!((1..=n).contains(&k), "k = {k} must be in 1..={n}");
    // w_i for the i-th smallest (1-based): w_n = k/n, w_{i-1} = w_i (i-k)/(i-1).
    let (mut expected_max, mut expected_min) = (0.0, 0.0);
    let mut w = k as f64 / n as f64;
    for i in (k..=n).rev() {
        expected_max += w * sorted[i - 1];
        // The same weight for the i-th largest gives the minimum.
        expected_min += w * sorted[n - i];
        if i > 1 {
            w *= (i - k) as f64 / (i - 1) as f64;
        }
        // Weights only shrink; once one is below the smallest normal double every later term
        // is too small to count (and arithmetic on subnormals is a hundred times slower: at
        // 10^6 seeds, waiting for an exact zero cost seconds).
        if w < f64::MIN_POSITIVE {
            break;
        }
    }
    let mean = sorted.iter().sum::<f64>() / n as f64;
    BestOfK {
        k,
        expected_max,
        expected_min,
        inflation: match direction {
            Direction::Max => expected_max - mean,
            Direction::Min => mean - expected_min,
        },
    }
}

/// k = 1, 2, 3, 5, 10, 20, 50, ... up to n, and n itself: the best-of-k curve.
pub fn k_grid(n: usize) -> Vec<usize> {
    let mut ks = Vec::new();
    let mut decade = 1;
    while decade <= n {
        for step in [1, 2, 3, 5] {
            let k = step * decade;
            if k <= n && !ks.contains(&k) {
                ks.push(k);
            }
        }
        decade *= 10;
    }
    if n > 0 && ks.last() != Some(&n) {
        ks.push(n);
    }
    ks
}

/// A 95% interval, with how it was computed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub low: f64,
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub high: f64,
    pub method: Method,
}

/// 95% intervals of the mean and the std over the seeds. Each was checked by simulation to
/// cover 93-97% of the time from 10 seeds up, normal or skewed (BENCHMARKS.md, "Coverage of
/// the intervals"); the percentile bootstrap, which covered 73-90% at 10 seeds, and an
/// interval of the gap (max - min), which no resampling of the seeds can give (a resample's
/// range never exceeds the sample's), are not offered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Intervals {
    pub mean: Interval,
    pub std: Interval,
}

const Z95: f64 = 1.959_963_984_540_054;

/// The intervals of `scores` (with its `summary`); none below 4 seeds (Bonett's trimmed mean
/// needs more than 4) or without spread.
pub fn intervals(scores: &[f64], summary: &Summary) -> Option<Intervals> {
    let n = scores.len();
    if n < 5 || summary.std.is_nan() || summary.std <= 0.0 {
        return None;
    }
    let t = StudentsT::new(0.0, 1.0, (n - 1) as f64).ok()?;
    let half = t.inverse_cdf(0.975) * summary.std / (n as f64).sqrt();
    Some(Intervals {
        mean: Interval {
            low: summary.mean - half,
            high: summary.mean + half,
            method: Method::StudentT,
        },
        std: bonett(scores, summary.mean, summary.std)?,
    })
}

/// Bonett's interval of the standard deviation (Computational Statistics & Data Analysis 50,
/// 2006): ln(c s^2) +- z se, with c = n / (n - z), se = c sqrt((k - (n - 3) / n) / (n - 1)),
/// and k = n sum (x - m)^4 / (sum (x - mean)^2)^2, m the mean trimmed by 1 / (2 sqrt(n - 4)) at
/// each end.
pub fn bonett(scores: &[f64], mean: f64, std: f64) -> Option<Interval> {
    let n = scores.len() as f64;
    let trim = 1.0 / (2.0 * (n - 4.0).sqrt());
    let sorted = sorted(scores.iter().copied());
    let cut = (trim * n).floor() as usize;
    let kept = &sorted[cut..sorted.len() - cut];
    let m = kept.iter().sum::<f64>() / kept.len() as f64;
    let fourth: f64 = scores.iter().map(|x| (x - m).powi(4)).sum();
    let squares: f64 = scores.iter().map(|x| (x - mean).powi(2)).sum();
    let kurtosis = n * fourth / (squares * squares);
    let c = n / (n - Z95);
    let se = c * ((kurtosis - (n - 3.0) / n) / (n - 1.0)).max(0.0).sqrt();
    let centre = (c * std * std).ln();
    let i = Interval {
        low: (centre - Z95 * se).exp().sqrt(),
        high: (centre + Z95 * se).exp().sqrt(),
        method: Method::Bonett,
    };
    (i.low.is_finite() && i.high.is_finite()).then_some(i)
}

/// How many seeds a 95% interval of the mean `width` wide needs (normal approximation with the
/// observed std): n = (2 * 1.96 * std / width)^2.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedsFor {
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub ci_width: f64,
    pub seeds: u64,
}

pub fn seeds_for_width(std: f64, width: f64) -> SeedsFor {
    let z = 1.959_963_984_540_054;
    SeedsFor {
        ci_width: width,
        seeds: ((2.0 * z * std / width).powi(2)).ceil().max(2.0) as u64,
    }
}

/// Scores across seeds at one epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochSpread {
    pub epoch: u32,
    pub n: u64,
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub mean: f64,
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub std: f64,
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub min: f64,
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub max: f64,
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub q1: f64,
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub median: f64,
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub q3: f64,
}

/// The spread across seeds at each epoch, from `(epoch, score)` pairs in any order.
pub fn epoch_spread(points: &[(u32, f64)]) -> Vec<EpochSpread> {
    let mut by_epoch: std::collections::BTreeMap<u32, Vec<f64>> = Default::default();
    for &(e, x) in points {
        by_epoch.entry(e).or_default().push(x);
    }
    by_epoch
        .into_iter()
        .map(|(epoch, xs)| {
            let mut m = Moments::default();
            xs.iter().for_each(|&x| m.push(x));
            let s = sorted(xs.into_iter());
            EpochSpread {
                epoch,
                n: m.n,
                mean: m.mean,
                std: m.std(),
                min: s[0],
                max: s[s.len() - 1],
                q1: quantile(&s, 0.25),
                median: quantile(&s, 0.5),
                q3: quantile(&s, 0.75),
            }
        })
        .collect()
}

/// [`epoch_spread`] from counted values: `(epoch, value, count)` sorted by epoch then value, as
/// the `epoch_values` table holds them (one row per distinct value). The same numbers as
/// expanding every value `count` times, in time proportional to the distinct values.
pub fn epoch_spread_counted(rows: &[(u32, f64, u64)]) -> Vec<EpochSpread> {
    rows.chunk_by(|a, b| a.0 == b.0)
        .map(|group| {
            let n: u64 = group.iter().map(|r| r.2).sum();
            let mean = group.iter().map(|r| r.1 * r.2 as f64).sum::<f64>() / n as f64;
            let ss: f64 = group
                .iter()
                .map(|r| r.2 as f64 * (r.1 - mean).powi(2))
                .sum();
            // The k-th smallest value (0-based) of the expanded list.
            let at = |k: u64| {
                let mut seen = 0;
                for r in group {
                    seen += r.2;
                    if k < seen {
                        return r.1;
                    }
                }
                group[group.len() - 1].1
            };
            // As `quantile`: linear between the order statistics around (n - 1) p.
            let q = |p: f64| {
                let h = (n - 1) as f64 * p;
                let lo = h.floor() as u64;
                if lo + 1 >= n {
                    return at(n - 1);
                }
                let (a, b) = (at(lo), at(lo + 1));
                a + (h - lo as f64) * (b - a)
            };
            EpochSpread {
                epoch: group[0].0,
                n,
                mean,
                std: if n > 1 {
                    (ss / (n - 1) as f64).sqrt()
                } else {
                    0.0
                },
                min: group[0].1,
                max: group[group.len() - 1].1,
                q1: q(0.25),
                median: q(0.5),
                q3: q(0.75),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::reference::{REFERENCE, close, f, floats, sweep};
    use super::super::summarize;
    use super::*;

    #[test]
    fn z_scores_and_black_swans_match_numpy() {
        let scores = sweep();
        let s = summarize(&scores, Direction::Max).unwrap();
        let (_, mad) = median_mad(&sorted(scores.iter().map(|x| x.1)));
        close(mad, f(&REFERENCE["summary"]["mad"]), 1e-9, "mad");
        // The merge equals sorting the deviations, odd and even counts alike.
        for v in [
            vec![1.0, 2.0, 4.0, 8.0, 9.5],
            vec![3.0, 3.0, 5.0, 10.0],
            vec![7.0],
        ] {
            let m = quantile(&v, 0.5);
            let by_sort = quantile(&sorted(v.iter().map(|x| (x - m).abs())), 0.5);
            assert_eq!(median_mad(&v).1, by_sort, "{v:?}");
        }
        let zs = floats(&REFERENCE["z"]);
        let robust = floats(&REFERENCE["robust_z"]);
        for (i, &(seed, x)) in scores.iter().enumerate() {
            let flagged = judge(seed, x, &Centre::of(&s, mad), Direction::Max);
            let by_robust = robust[i].abs() > ROBUST_Z_LIMIT;
            let by_z = zs[i].abs() > Z_LIMIT;
            assert_eq!(flagged.is_some(), by_robust || by_z, "seed {seed}");
            if let Some(b) = flagged {
                close(b.z, zs[i], 1e-9, "z");
                close(b.robust_z.unwrap(), robust[i], 1e-9, "robust z");
            }
        }
        let swans = black_swans(&scores, &s, mad, Direction::Max);
        // Seed 109 (0.871) is far below and 103 (0.961) far above; the farthest comes first.
        assert_eq!(swans[0].seed, 109);
        assert_eq!((swans[0].side, swans[0].lucky), (Side::Low, false));
        assert!(
            swans
                .iter()
                .any(|b| b.seed == 103 && b.side == Side::High && b.lucky)
        );
        // When lower is better, the low seed is the lucky one.
        let swans = black_swans(&scores, &s, mad, Direction::Min);
        assert_eq!((swans[0].seed, swans[0].lucky), (109, true));
    }

    #[test]
    fn best_of_k_matches_brute_force_over_subsets() {
        let s = sorted(sweep().into_iter().map(|x| x.1));
        for r in REFERENCE["best_of_k"].as_array().unwrap() {
            let k = r["k"].as_u64().unwrap() as usize;
            let b = best_of_k(&s, k, Direction::Max);
            close(b.expected_max, f(&r["expected_max"]), 1e-12, "E[max]");
            close(b.expected_min, f(&r["expected_min"]), 1e-12, "E[min]");
            let mean = s.iter().sum::<f64>() / s.len() as f64;
            let down = best_of_k(&s, k, Direction::Min);
            close(
                down.inflation,
                mean - b.expected_min,
                1e-12,
                "mean - E[min]",
            );
            assert!(
                down.inflation >= -1e-12,
                "the best of k is never worse than the mean"
            );
        }
        let one = best_of_k(&s, 1, Direction::Max);
        assert!(one.inflation.abs() < 1e-12, "best of 1 is the mean");
        assert_eq!(k_grid(14), vec![1, 2, 3, 5, 10, 14]);
        assert_eq!(k_grid(1), vec![1]);
    }

    #[test]
    fn intervals_agree_with_scipy() {
        let scores: Vec<f64> = sweep().into_iter().map(|x| x.1).collect();
        let s = summarize(&sweep(), Direction::Max).unwrap();
        let ci = intervals(&scores, &s).unwrap();
        let t = floats(&REFERENCE["mean_ci_t"]);
        close(ci.mean.low, t[0], 1e-9, "t low");
        close(ci.mean.high, t[1], 1e-9, "t high");
        assert_eq!(ci.mean.method, Method::StudentT);
        let b = floats(&REFERENCE["bonett_std"]);
        close(ci.std.low, b[0], 1e-9, "Bonett low");
        close(ci.std.high, b[1], 1e-9, "Bonett high");
        assert_eq!(ci.std.method, Method::Bonett);
        let json = serde_json::to_value(&ci).unwrap();
        assert_eq!(
            (&json["mean"]["method"], &json["std"]["method"]),
            (&"student-t".into(), &"bonett".into())
        );
        // Too few seeds, or no spread: no interval rather than a wrong one.
        assert!(intervals(&scores[..4], &s).is_none());
        let flat = [0.9; 6];
        let s_flat = summarize(&[(0, 0.9); 6], Direction::Max).unwrap();
        assert!(intervals(&flat, &s_flat).is_none());
    }

    #[test]
    fn seeds_needed_shrink_with_the_square_of_the_width() {
        let a = seeds_for_width(0.01, 0.01).seeds;
        let b = seeds_for_width(0.01, 0.005).seeds;
        assert_eq!(a, 16);
        assert!((b as f64 / a as f64 - 4.0).abs() < 0.2);
    }

    #[test]
    fn counted_values_give_the_same_spread_as_the_values() {
        // Accuracies on 200 examples: many ties, several epochs, counts from 1 up.
        let mut rng = 12345u64;
        let mut points = Vec::new();
        for epoch in 1..=4u32 {
            for _ in 0..(37 * epoch as usize) {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let hits = 150 + (rng >> 60) as u32 + epoch * 3;
                points.push((epoch, hits as f64 / 200.0));
            }
        }
        points.push((5, 0.5));
        let mut counted: Vec<(u32, f64, u64)> = Vec::new();
        let mut sorted_points = points.clone();
        sorted_points.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        for (e, v) in sorted_points {
            match counted.last_mut() {
                Some(last) if last.0 == e && last.1 == v => last.2 += 1,
                _ => counted.push((e, v, 1)),
            }
        }
        assert!(counted.len() < points.len() / 2, "the test needs ties");
        let (want, got) = (epoch_spread(&points), epoch_spread_counted(&counted));
        assert_eq!(want.len(), got.len());
        for (w, g) in want.iter().zip(&got) {
            assert_eq!((w.epoch, w.n, w.min, w.max), (g.epoch, g.n, g.min, g.max));
            for (a, b) in [
                (w.mean, g.mean),
                (w.std, g.std),
                (w.q1, g.q1),
                (w.median, g.median),
                (w.q3, g.q3),
            ] {
                assert!((a - b).abs() < 1e-12, "{w:?} {g:?}");
            }
        }
    }

    #[test]
    fn epoch_spread_matches_numpy() {
        let r = &REFERENCE["epochs"];
        let mut points = Vec::new();
        for curve in r["curves"].as_array().unwrap() {
            for (e, x) in floats(curve).into_iter().enumerate() {
                points.push((e as u32 + 1, x));
            }
        }
        let got = epoch_spread(&points);
        for (g, w) in got.iter().zip(r["spread"].as_array().unwrap()) {
            assert_eq!(g.epoch as u64, w["epoch"].as_u64().unwrap());
            assert_eq!(g.n, w["n"].as_u64().unwrap());
            for (x, key) in [
                (g.mean, "mean"),
                (g.std, "std"),
                (g.min, "min"),
                (g.max, "max"),
                (g.q1, "q1"),
                (g.median, "median"),
                (g.q3, "q3"),
            ] {
                close(x, f(&w[key]), 1e-12, key);
            }
        }
    }
}
