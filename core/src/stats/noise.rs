//! How much of the seed-to-seed spread is noise of a finite test set (K. Jordan, "On the
//! variance of neural network training with respect to test sets and distributions", 2023).
//!
//! With p the mean accuracy and n test examples, a fixed classifier's accuracy already varies by
//! the binomial std sqrt(p(1-p)/n) from one test set to another. From which examples each run got
//! right (a bitmap per run), the independent-errors model predicts the spread across runs,
//! Var(acc) ~ (1/n^2) sum_i e_i (1 - e_i) with e_i example i's error rate over runs, and the
//! distribution-wise variance, n/(n-1) [Var_runs(err) - (1/n^2) sum_i Var_runs(err_i)], is the
//! part that would remain on an infinite test set. A split-half check correlates each run's
//! accuracy on the even-numbered examples with that on the odd-numbered ones: near zero, a
//! lucky seed is lucky on one half only.

use serde::{Deserialize, Serialize};

/// Bit `i` of a bitmap (little-endian within bytes): whether the run got example `i` right.
pub fn bit(bitmap: &[u8], i: usize) -> bool {
    bitmap[i / 8] >> (i % 8) & 1 == 1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestSetNoise {
    pub test_examples: u64,
    /// sqrt(p(1-p)/n) at the mean accuracy.
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub binomial_std: f64,
    /// The observed std of accuracy across the runs with bitmaps.
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub observed_std: f64,
    pub runs: u64,
    /// sqrt((1/n^2) sum_i e_i (1 - e_i)).
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub independent_errors_std: f64,
    /// The unbiased distribution-wise variance estimate (may be negative from sampling noise).
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub distribution_var: f64,
    /// sqrt(max(0, distribution_var)).
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub distribution_std: f64,
    /// Pearson correlation across runs of accuracy on even- and odd-numbered examples.
    pub split_half_correlation: Option<f64>,
}

/// The binomial std of an accuracy `p` measured on `n` examples.
pub fn binomial_std(p: f64, n: u64) -> f64 {
    (p * (1.0 - p) / n as f64).sqrt()
}

fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    let (mx, my) = (
        x.iter().sum::<f64>() / x.len() as f64,
        y.iter().sum::<f64>() / y.len() as f64,
    );
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx).powi(2);
        syy += (b - my).powi(2);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

/// From the bitmaps of runs over the same `n` test examples; `None` below two runs. Bitmaps of
/// another length are the caller's to refuse.
pub fn test_set_noise(bitmaps: &[&[u8]], n: usize) -> Option<TestSetNoise> {
    let runs = bitmaps.len();
    if runs < 2 || n < 2 {
        return None;
    }
    let nf = n as f64;
    let mut wrong = vec![0u32; n];
    let (mut acc, mut even, mut odd) = (Vec::new(), Vec::new(), Vec::new());
    for bm in bitmaps {
        let (mut right, mut right_even, mut right_odd) = (0u64, 0u64, 0u64);
        for (i, w) in wrong.iter_mut().enumerate() {
            if bit(bm, i) {
                right += 1;
                if i % 2 == 0 {
                    right_even += 1
                } else {
                    right_odd += 1
                }
            } else {
                *w += 1;
            }
        }
        acc.push(right as f64 / nf);
        even.push(right_even as f64 / n.div_ceil(2) as f64);
        odd.push(right_odd as f64 / (n / 2) as f64);
    }
    let r = runs as f64;
    let e: Vec<f64> = wrong.iter().map(|&w| w as f64 / r).collect();
    let independent = e.iter().map(|e| e * (1.0 - e)).sum::<f64>() / (nf * nf);
    // Sample variance over runs of each example's 0/1 error.
    let per_example: f64 = e.iter().map(|e| e * (1.0 - e) * r / (r - 1.0)).sum();
    let mut moments = super::Moments::default();
    acc.iter().for_each(|&a| moments.push(a));
    let var_err = moments.std().powi(2);
    let distribution_var = nf / (nf - 1.0) * (var_err - per_example / (nf * nf));
    let mean_acc = acc.iter().sum::<f64>() / r;
    Some(TestSetNoise {
        test_examples: n as u64,
        binomial_std: binomial_std(mean_acc, n as u64),
        observed_std: var_err.sqrt(),
        runs: runs as u64,
        independent_errors_std: independent.sqrt(),
        distribution_var,
        distribution_std: distribution_var.max(0.0).sqrt(),
        split_half_correlation: pearson(&even, &odd),
    })
}

#[cfg(test)]
mod tests {
    use super::super::reference::{REFERENCE, close, f};
    use super::*;

    #[test]
    fn matches_numpy() {
        let r = &REFERENCE["bitmaps"];
        let n = r["examples"].as_u64().unwrap() as usize;
        let maps: Vec<Vec<u8>> = r["bitmaps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                b.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u8)
                    .collect()
            })
            .collect();
        let refs: Vec<&[u8]> = maps.iter().map(|m| m.as_slice()).collect();
        let got = test_set_noise(&refs, n).unwrap();
        close(got.binomial_std, f(&r["binomial_std"]), 1e-12, "binomial");
        close(got.observed_std, f(&r["observed_std"]), 1e-12, "observed");
        close(
            got.independent_errors_std,
            f(&r["independent_errors_std"]),
            1e-12,
            "independent",
        );
        close(
            got.distribution_var,
            f(&r["distribution_var"]),
            1e-9,
            "distribution",
        );
        close(
            got.split_half_correlation.unwrap(),
            f(&r["split_half_correlation"]),
            1e-9,
            "split half",
        );
        assert!(test_set_noise(&refs[..1], n).is_none());
    }
}
