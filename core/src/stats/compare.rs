//! Two sweeps against each other: is A's improvement bigger than what a lucky seed buys?

use super::Moments;
use super::describe::Interval;
use crate::metric::Direction;
use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, Normal, StudentsT};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Side {
    pub n: u64,
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub mean: f64,
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub std: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub a: Side,
    pub b: Side,
    /// mean(A) - mean(B).
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub difference: f64,
    /// 95% Welch interval of the difference.
    pub difference_ci: Interval,
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub welch_t: f64,
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub welch_df: f64,
    /// Two-sided.
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub welch_p: f64,
    /// Mann-Whitney U of A (ties count one half).
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub mann_whitney_u: f64,
    /// Two-sided, normal approximation with tie and continuity corrections (scipy's
    /// `method="asymptotic"`).
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub mann_whitney_p: f64,
    /// P(a random seed of A scores better than a random seed of B), ties counting one half:
    /// U / (nA nB) when higher is better, 1 - U / (nA nB) when lower is.
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub prob_a_beats_b: f64,
    /// Which way the metric improves, which `prob_a_beats_b` follows.
    pub direction: Direction,
}

fn side(x: &[f64]) -> (Side, f64) {
    let mut m = Moments::default();
    x.iter().for_each(|&v| m.push(v));
    let var = m.std().powi(2);
    (
        Side {
            n: m.n,
            mean: m.mean,
            std: m.std(),
        },
        var,
    )
}

/// Compares the scores of two sweeps; `None` unless each has at least two. `direction`: which
/// way the metric improves.
pub fn compare(a: &[f64], b: &[f64], direction: Direction) -> Option<Comparison> {
    if a.len() < 2 || b.len() < 2 {
        return None;
    }
    let (sa, var_a) = side(a);
    let (sb, var_b) = side(b);
    let (na, nb) = (a.len() as f64, b.len() as f64);
    let (va, vb) = (var_a / na, var_b / nb);
    let difference = sa.mean - sb.mean;
    let se = (va + vb).sqrt();
    let df = (va + vb).powi(2) / (va * va / (na - 1.0) + vb * vb / (nb - 1.0));
    let (welch_t, welch_p, half) = if se > 0.0 {
        let t = StudentsT::new(0.0, 1.0, df).ok()?;
        let stat = difference / se;
        (stat, 2.0 * t.sf(stat.abs()), t.inverse_cdf(0.975) * se)
    } else if difference == 0.0 {
        // Both sides constant and equal: no evidence of a difference.
        (0.0, 1.0, 0.0)
    } else {
        // Both sides constant and apart: the difference is exact (scipy: t = ±inf, p = 0).
        (difference.signum() * f64::INFINITY, 0.0, 0.0)
    };

    // Mann-Whitney U with midranks over the pooled scores.
    let mut pooled: Vec<(f64, bool)> = a
        .iter()
        .map(|&x| (x, true))
        .chain(b.iter().map(|&x| (x, false)))
        .collect();
    pooled.sort_by(|x, y| x.0.total_cmp(&y.0));
    let n = pooled.len();
    let (mut rank_sum_a, mut ties) = (0.0, 0.0);
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && pooled[j + 1].0 == pooled[i].0 {
            j += 1;
        }
        let midrank = (i + j) as f64 / 2.0 + 1.0;
        let t = (j - i + 1) as f64;
        ties += t * t * t - t;
        rank_sum_a += midrank * pooled[i..=j].iter().filter(|p| p.1).count() as f64;
        i = j + 1;
    }
    let u = rank_sum_a - na * (na + 1.0) / 2.0;
    let mu = na * nb / 2.0;
    let nn = na + nb;
    let sigma = (na * nb / 12.0 * ((nn + 1.0) - ties / (nn * (nn - 1.0)))).sqrt();
    let mann_whitney_p = if sigma > 0.0 {
        let z = ((u - mu).abs() - 0.5).max(0.0) / sigma;
        (2.0 * Normal::standard().sf(z)).min(1.0)
    } else {
        1.0
    };
    Some(Comparison {
        a: sa,
        b: sb,
        difference,
        difference_ci: Interval {
            low: difference - half,
            high: difference + half,
            method: super::describe::Method::WelchT,
        },
        welch_t,
        welch_df: df,
        welch_p,
        mann_whitney_u: u,
        mann_whitney_p,
        prob_a_beats_b: match direction {
            Direction::Max => u / (na * nb),
            Direction::Min => 1.0 - u / (na * nb),
        },
        direction,
    })
}

#[cfg(test)]
mod tests {
    use super::super::reference::{REFERENCE, close, f, floats};
    use super::*;

    #[test]
    fn matches_scipy() {
        let r = &REFERENCE["compare"];
        let c = compare(&floats(&r["a"]), &floats(&r["b"]), Direction::Max).unwrap();
        close(c.difference, f(&r["difference"]), 1e-9, "difference");
        let ci = floats(&r["ci"]);
        close(c.difference_ci.low, ci[0], 1e-9, "ci low");
        close(c.difference_ci.high, ci[1], 1e-9, "ci high");
        close(c.welch_t, f(&r["welch_t"]), 1e-9, "welch t");
        close(c.welch_df, f(&r["welch_df"]), 1e-9, "welch df");
        close(c.welch_p, f(&r["welch_p"]), 1e-7, "welch p");
        close(c.mann_whitney_u, f(&r["mann_whitney_u"]), 1e-12, "U");
        close(c.mann_whitney_p, f(&r["mann_whitney_p"]), 1e-7, "U p");
        close(c.prob_a_beats_b, f(&r["prob_a_beats_b"]), 1e-12, "P(A > B)");
        assert!(compare(&[1.0], &[1.0, 2.0], Direction::Max).is_none());
        let same = compare(&[1.0, 1.0], &[1.0, 1.0], Direction::Max).unwrap();
        assert_eq!(
            (same.welch_p, same.mann_whitney_p, same.prob_a_beats_b),
            (1.0, 1.0, 0.5)
        );
    }

    /// Two constant sides apart: the Welch test rejects equal means outright, as scipy does
    /// (`ttest_ind(equal_var=False)`: t = inf, p = 0), instead of calling them equal.
    #[test]
    fn constant_sides_apart_differ_for_certain() {
        let c = compare(&[0.9, 0.9], &[0.8, 0.8], Direction::Max).unwrap();
        assert_eq!((c.welch_t, c.welch_p), (f64::INFINITY, 0.0));
        let c = compare(&[0.8, 0.8], &[0.9, 0.9], Direction::Max).unwrap();
        assert_eq!((c.welch_t, c.welch_p), (f64::NEG_INFINITY, 0.0));
        assert!((c.difference + 0.1).abs() < 1e-12);
    }

    /// When lower is better, A beats B where its scores are lower: the probability mirrors.
    #[test]
    fn lower_is_better_mirrors_the_probability() {
        let (a, b) = ([1.0, 2.0, 3.0], [2.0, 3.0, 4.0, 5.0]);
        let up = compare(&a, &b, Direction::Max).unwrap();
        let down = compare(&a, &b, Direction::Min).unwrap();
        assert!(down.prob_a_beats_b > 0.5);
        assert!((up.prob_a_beats_b + down.prob_a_beats_b - 1.0).abs() < 1e-12);
        assert_eq!((up.difference, up.welch_p), (down.difference, down.welch_p));
    }
}
