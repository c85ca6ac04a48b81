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

/// What the test-set statistics need of every run over the same `examples` test examples, kept
/// up to date one run at a time: each example's error count, and exact integer sums of each run's
/// hits over all examples and over the even- and odd-numbered ones (for the split-half
/// correlation). Adding a run costs O(examples) whatever the number of runs, and the statistics
/// are read from the tally in O(examples), so the store keeps one per sweep and test-set size
/// instead of reading every bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestSetTally {
    pub examples: u32,
    /// How many runs each example was wrong in.
    pub wrong: Vec<u32>,
    pub sums: HitSums,
}

/// Sums over runs of each run's hits: `right` over all examples, `even` and `odd` over the even-
/// and odd-numbered ones. Integers, so a tally is the same whatever the order runs arrive in;
/// within range for [`crate::domain::MAX_TEST_EXAMPLES`] examples and 10^7 runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HitSums {
    pub runs: i64,
    pub right: i64,
    pub right_sq: i64,
    pub even: i64,
    pub even_sq: i64,
    pub odd: i64,
    pub odd_sq: i64,
    pub even_odd: i64,
}

impl TestSetTally {
    pub fn new(examples: u32) -> TestSetTally {
        TestSetTally {
            examples,
            wrong: vec![0; examples as usize],
            sums: HitSums::default(),
        }
    }

    /// Adds one run's bitmap, which must cover `examples` examples (checked when it arrived:
    /// [`crate::domain::Correctness::new`]).
    pub fn add(&mut self, bitmap: &[u8]) {
        let (mut even, mut odd) = (0i64, 0i64);
        // A byte per 8 examples; example 8k + j is even-numbered when j is.
        for (chunk, &byte) in self.wrong.chunks_mut(8).zip(bitmap) {
            if byte == 0xff && chunk.len() == 8 {
                (even, odd) = (even + 4, odd + 4);
                continue;
            }
            for (j, w) in chunk.iter_mut().enumerate() {
                match (byte >> j & 1 == 1, j % 2 == 0) {
                    (true, true) => even += 1,
                    (true, false) => odd += 1,
                    (false, _) => *w += 1,
                }
            }
        }
        let right = even + odd;
        let s = &mut self.sums;
        s.runs += 1;
        s.right += right;
        s.right_sq += right * right;
        s.even += even;
        s.even_sq += even * even;
        s.odd += odd;
        s.odd_sq += odd * odd;
        s.even_odd += even * odd;
    }

    /// The error counts as stored: little-endian `u32`s, one per example.
    pub fn wrong_bytes(&self) -> Vec<u8> {
        self.wrong.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// A tally read back from storage; `None` when the error counts do not cover `examples`.
    pub fn from_stored(examples: u32, wrong: &[u8], sums: HitSums) -> Option<TestSetTally> {
        (wrong.len() == examples as usize * 4).then(|| TestSetTally {
            examples,
            wrong: wrong
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            sums,
        })
    }

    /// The statistics; `None` below two runs or two examples.
    pub fn noise(&self) -> Option<TestSetNoise> {
        let s = &self.sums;
        let n = self.examples as usize;
        if s.runs < 2 || n < 2 {
            return None;
        }
        let (nf, r) = (n as f64, s.runs as f64);
        let e = |w: &u32| *w as f64 / r;
        let independent = self.wrong.iter().map(|w| e(w) * (1.0 - e(w))).sum::<f64>() / (nf * nf);
        // Sample variance over runs of each example's 0/1 error.
        let per_example = independent * nf * nf * r / (r - 1.0);
        // r * sum(x^2) - sum(x)^2, exactly: r (r - 1) times the sample variance of the hits.
        let spread =
            |sq: i64, sum: i64| i128::from(s.runs) * i128::from(sq) - i128::from(sum).pow(2);
        let var_err = spread(s.right_sq, s.right) as f64 / (r * (r - 1.0) * nf * nf);
        let distribution_var = nf / (nf - 1.0) * (var_err - per_example / (nf * nf));
        let mean_acc = s.right as f64 / (r * nf);
        let (sxx, syy) = (spread(s.even_sq, s.even), spread(s.odd_sq, s.odd));
        let sxy =
            i128::from(s.runs) * i128::from(s.even_odd) - i128::from(s.even) * i128::from(s.odd);
        Some(TestSetNoise {
            test_examples: n as u64,
            binomial_std: binomial_std(mean_acc, n as u64),
            observed_std: var_err.sqrt(),
            runs: s.runs as u64,
            independent_errors_std: independent.sqrt(),
            distribution_var,
            distribution_std: distribution_var.max(0.0).sqrt(),
            split_half_correlation: (sxx > 0 && syy > 0)
                .then(|| sxy as f64 / ((sxx as f64) * (syy as f64)).sqrt()),
        })
    }
}

/// From the bitmaps of runs over the same `n` test examples; `None` below two runs.
pub fn test_set_noise(bitmaps: &[&[u8]], n: u32) -> Option<TestSetNoise> {
    let mut tally = TestSetTally::new(n);
    bitmaps.iter().for_each(|b| tally.add(b));
    tally.noise()
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
        let got = test_set_noise(&refs, n as u32).unwrap();
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
        assert!(test_set_noise(&refs[..1], n as u32).is_none());
        // Stored and read back, a tally is the same.
        let mut tally = TestSetTally::new(n as u32);
        refs.iter().for_each(|b| tally.add(b));
        let back = TestSetTally::from_stored(n as u32, &tally.wrong_bytes(), tally.sums).unwrap();
        assert_eq!(back, tally);
        assert!(
            TestSetTally::from_stored(n as u32 + 1, &tally.wrong_bytes(), tally.sums).is_none()
        );
    }
}
