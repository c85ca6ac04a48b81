//! Summary statistics of final scores over seeds.

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub n: u64,
    pub mean: f64,
    /// Sample standard deviation (divides by n - 1); 0 for a single seed.
    pub std: f64,
    pub min: f64,
    pub max: f64,
    pub worst_seed: i64,
    pub best_seed: i64,
}

/// Summarises `(seed, score)` pairs; `None` when there are none. Ties for best or worst go to the
/// smallest seed, so the answer does not depend on the order results arrived in.
pub fn summarize(scores: &[(i64, f64)]) -> Option<Summary> {
    let (&(first_seed, first), rest) = scores.split_first()?;
    let (mut n, mut mean, mut m2) = (1.0f64, first, 0.0f64);
    let (mut min, mut max, mut worst_seed, mut best_seed) = (first, first, first_seed, first_seed);
    for &(seed, x) in rest {
        // Welford's update: stable for 10^4+ scores that agree to many digits.
        n += 1.0;
        let delta = x - mean;
        mean += delta / n;
        m2 += delta * (x - mean);
        if x < min || (x == min && seed < worst_seed) {
            (min, worst_seed) = (x, seed);
        }
        if x > max || (x == max && seed < best_seed) {
            (max, best_seed) = (x, seed);
        }
    }
    let std = if n > 1.0 {
        (m2 / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    Some(Summary {
        n: n as u64,
        mean,
        std,
        min,
        max,
        worst_seed,
        best_seed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_textbook_formulas() {
        let s = summarize(&[(3, 0.9), (1, 0.8), (2, 0.85), (7, 0.9)]).unwrap();
        assert_eq!(s.n, 4);
        assert!((s.mean - 0.8625).abs() < 1e-12);
        let var = [0.9, 0.8, 0.85, 0.9]
            .iter()
            .map(|x: &f64| (x - 0.8625).powi(2))
            .sum::<f64>()
            / 3.0;
        assert!((s.std - var.sqrt()).abs() < 1e-12);
        assert_eq!((s.min, s.worst_seed), (0.8, 1));
        assert_eq!((s.max, s.best_seed), (0.9, 3));
    }

    #[test]
    fn one_and_none() {
        assert_eq!(summarize(&[]), None);
        let s = summarize(&[(5, 0.5)]).unwrap();
        assert_eq!((s.n, s.std, s.best_seed, s.worst_seed), (1, 0.0, 5, 5));
    }
}
