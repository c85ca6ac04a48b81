//! What became of a sweep's seeds beyond their scores: how many finished, how many of those
//! converged and how many diverged (with an interval for the rate), how many failed and why.
//! A diverged run is the blackest swan there is; a study that drops it under-reports the lower
//! tail, so every document of statistics carries these counts beside the score's.

use serde::{Deserialize, Serialize};

/// The most diverged seeds and failure causes a document lists (the counts are always whole).
pub const LISTED: usize = 100;

/// A finished seed whose run diverged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DivergedSeed {
    pub seed: i64,
    /// The epoch whose metrics were not finite.
    pub epoch: u32,
    /// The epochs it finished with finite metrics.
    pub epochs: u32,
    /// The metric at its last finite epoch, when it had one.
    pub last_value: Option<f64>,
}

/// Failed seeds that share the cause of their last attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureCause {
    pub cause: String,
    pub seeds: u64,
}

/// A proportion with its 95% interval, named by its method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    pub estimate: f64,
    pub low: f64,
    pub high: f64,
    /// "wilson": the Wilson score interval (covers near 95% even at 0 or n events, where the
    /// normal approximation's does not).
    pub method: String,
}

/// The outcomes of a sweep's seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcomes {
    /// Seeds with a recorded result: converged + diverged.
    pub finished: u64,
    /// Finished with finite metrics: the seeds every statistic of the score describes.
    pub converged: u64,
    pub diverged: u64,
    /// diverged / finished, absent before any seed finished.
    pub divergence_rate: Option<Rate>,
    /// Out of attempts (or failed for a cause a deterministic run met on another worker).
    pub failed: u64,
    /// The failed seeds by the cause of their last attempt, most frequent first (at most
    /// [`LISTED`]).
    pub failure_causes: Vec<FailureCause>,
    /// The diverged seeds, earliest divergence first (at most [`LISTED`]).
    pub diverged_seeds: Vec<DivergedSeed>,
}

impl Outcomes {
    /// From the store's counts and rows: `diverged` all of them, `causes` the failed seeds'.
    pub fn new(
        converged: u64,
        mut diverged: Vec<DivergedSeed>,
        mut causes: Vec<FailureCause>,
    ) -> Outcomes {
        let (d, failed) = (diverged.len() as u64, causes.iter().map(|c| c.seeds).sum());
        let finished = converged + d;
        diverged.sort_by_key(|s| (s.epoch, s.seed));
        diverged.truncate(LISTED);
        causes.sort_by(|a, b| b.seeds.cmp(&a.seeds).then_with(|| a.cause.cmp(&b.cause)));
        causes.truncate(LISTED);
        Outcomes {
            finished,
            converged,
            diverged: d,
            divergence_rate: (finished > 0).then(|| wilson(d, finished)),
            failed,
            failure_causes: causes,
            diverged_seeds: diverged,
        }
    }

    /// "n finished: c converged, d diverged (rate, 95% interval), f failed", one line.
    pub fn line(&self) -> String {
        let rate = match &self.divergence_rate {
            Some(r) => format!(
                " ({:.1}%, 95% {} interval {:.1}-{:.1}%)",
                100.0 * r.estimate,
                r.method,
                100.0 * r.low,
                100.0 * r.high
            ),
            None => String::new(),
        };
        format!(
            "{} finished: {} converged, {} diverged{rate}; {} failed",
            self.finished, self.converged, self.diverged, self.failed
        )
    }
}

/// The Wilson score interval (95%) of `events` in `n` trials.
pub fn wilson(events: u64, n: u64) -> Rate {
    const Z: f64 = 1.959_963_984_540_054;
    let (k, n) = (events as f64, n as f64);
    let p = k / n;
    let z2 = Z * Z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = Z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    Rate {
        estimate: p,
        low: (centre - half).max(0.0),
        high: (centre + half).min(1.0),
        method: "wilson".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against scipy 1.17, `binomtest(k, n).proportion_ci(0.95, method="wilson")`.
    #[test]
    fn wilson_matches_scipy() {
        for (k, n, low, high) in [
            (1, 10, 0.017_876_213_1, 0.404_150_026_8),
            (0, 20, 0.0, 0.161_125_158_1),
            (7, 7, 0.645_669_564_9, 1.0),
            (13, 1000, 0.007_612_820_4, 0.022_114_442_4),
        ] {
            let r = wilson(k, n);
            assert!((r.low - low).abs() < 1e-8, "{k}/{n}: low {} vs {low}", r.low);
            assert!((r.high - high).abs() < 1e-8, "{k}/{n}: high {} vs {high}", r.high);
        }
    }

    #[test]
    fn outcomes_count_every_finished_seed_and_list_the_earliest_divergence_first() {
        let d = |seed, epoch| DivergedSeed {
            seed,
            epoch,
            epochs: epoch - 1,
            last_value: None,
        };
        let cause = |c: &str, seeds| FailureCause {
            cause: c.into(),
            seeds,
        };
        let o = Outcomes::new(
            8,
            vec![d(5, 3), d(2, 1)],
            vec![cause("oom", 1), cause("segfault", 2)],
        );
        assert_eq!((o.finished, o.converged, o.diverged, o.failed), (10, 8, 2, 3));
        assert_eq!(o.diverged_seeds[0].seed, 2);
        assert_eq!(o.failure_causes[0].cause, "segfault");
        assert!((o.divergence_rate.as_ref().unwrap().estimate - 0.2).abs() < 1e-12);
        assert!(o.line().starts_with("10 finished: 8 converged, 2 diverged (20.0%"));
        assert_eq!(Outcomes::new(0, vec![], vec![]).divergence_rate, None);
    }
}
