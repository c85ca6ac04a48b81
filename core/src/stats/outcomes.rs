//! What became of a sweep's seeds beyond their scores: how many finished, how many of those
//! converged and how many diverged (with an interval for the rate), how many failed and why.
//! A diverged run is the blackest swan there is; a study that drops it under-reports the lower
//! tail, so every document of statistics carries these counts beside the score's.

use super::describe::Method;
use serde::{Deserialize, Serialize};
use statrs::distribution::{Beta, ContinuousCDF};

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
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    pub estimate: f64,
    pub low: f64,
    pub high: f64,
    /// "clopper-pearson": the exact binomial interval, which never covers less than 95% (a rare
    /// event's rate has no interval that covers 93-97% at every n: BENCHMARKS.md).
    pub method: Method,
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
            divergence_rate: (finished > 0).then(|| clopper_pearson(d, finished)),
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
                r.method.as_str(),
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

/// The Clopper-Pearson interval (95%) of `events` in `n` trials (n > 0): the Beta quantiles
/// of the exact binomial tails.
pub fn clopper_pearson(events: u64, n: u64) -> Rate {
    let (k, n) = (events as f64, n as f64);
    let quantile = |a: f64, b: f64, p: f64| Beta::new(a, b).map_or(f64::NAN, |d| d.inverse_cdf(p));
    Rate {
        estimate: k / n,
        low: if events == 0 {
            0.0
        } else {
            quantile(k, n - k + 1.0, 0.025)
        },
        high: if k == n {
            1.0
        } else {
            quantile(k + 1.0, n - k, 0.975)
        },
        method: Method::ClopperPearson,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLOPPER_PEARSON: [(u64, u64, f64, f64); 5] = [
        (1, 10, 0.002_528_578_544, 0.445_016_117_028),
        (0, 20, 0.0, 0.168_433_470_983),
        (7, 7, 0.590_383_602_775, 1.0),
        (13, 1000, 0.006_939_617_503, 0.022_127_803_637),
        (3, 9, 0.074_854_631_420, 0.700_704_943_791),
    ];

    /// Against scipy 1.17, `binomtest(k, n).proportion_ci(0.95, method="exact")`.
    #[test]
    fn clopper_pearson_matches_scipy() {
        for (k, n, low, high) in CLOPPER_PEARSON {
            let r = clopper_pearson(k, n);
            assert!(
                (r.low - low).abs() < 1e-8,
                "{k}/{n}: low {} vs {low}",
                r.low
            );
            assert!(
                (r.high - high).abs() < 1e-8,
                "{k}/{n}: high {} vs {high}",
                r.high
            );
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
        assert_eq!(
            (o.finished, o.converged, o.diverged, o.failed),
            (10, 8, 2, 3)
        );
        assert_eq!(o.diverged_seeds[0].seed, 2);
        assert_eq!(o.failure_causes[0].cause, "segfault");
        assert!((o.divergence_rate.as_ref().unwrap().estimate - 0.2).abs() < 1e-12);
        assert!(
            o.line()
                .starts_with("10 finished: 8 converged, 2 diverged (20.0%")
        );
        assert_eq!(Outcomes::new(0, vec![], vec![]).divergence_rate, None);
    }
}
