//! The statistics documents: what `GetSweepStats` and `CompareSweeps` send as JSON, and what
//! `sweep stats` and `sweep compare` read (and print with `--json`). One set of types, written by
//! the server and parsed by the client.

use super::SweepStats;
use super::compare::Comparison;
use super::outcomes::Outcomes;
use crate::domain::Metric;
use serde::{Deserialize, Serialize};

/// One sweep's statistics of one metric.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatsDocument {
    pub sweep_id: String,
    /// What became of every seed: the statistics in `body` describe the converged ones only.
    pub outcomes: Outcomes,
    #[serde(flatten)]
    pub body: StatsBody,
}

/// The statistics, or the count of zero before the sweep's first result with the metric.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StatsBody {
    Stats(Box<SweepStats>),
    NoResultYet { metric: Metric, n: NoneYet },
}

/// The count of a document without results: zero, and only zero (so that a document of
/// statistics that fails to parse is an error, not an empty sweep).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct NoneYet;

impl TryFrom<u64> for NoneYet {
    type Error = String;
    fn try_from(n: u64) -> Result<NoneYet, String> {
        if n == 0 {
            Ok(NoneYet)
        } else {
            Err(format!("{n} results but no statistics"))
        }
    }
}

impl From<NoneYet> for u64 {
    fn from(_: NoneYet) -> u64 {
        0
    }
}

impl StatsDocument {
    pub fn new(
        sweep_id: String,
        metric: Metric,
        stats: Option<SweepStats>,
        outcomes: Outcomes,
    ) -> StatsDocument {
        let body = match stats {
            Some(s) => StatsBody::Stats(Box::new(s)),
            None => StatsBody::NoResultYet { metric, n: NoneYet },
        };
        StatsDocument {
            sweep_id,
            outcomes,
            body,
        }
    }
}

/// Two sweeps' values of one metric against each other.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ComparisonDocument {
    pub metric: Metric,
    pub sweep_a: String,
    pub sweep_b: String,
    #[serde(flatten)]
    pub comparison: Comparison,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Metric, Scored};

    fn runs(values: &[f64]) -> Vec<Scored> {
        let seeds = 0..values.len() as i64;
        seeds
            .zip(values)
            .map(|(seed, &value)| Scored {
                seed,
                factors: [seed; 4],
                value,
            })
            .collect()
    }

    /// What the server writes, the client reads back whole, NaN included.
    #[test]
    fn documents_round_trip() {
        let values = [0.91, 0.93, 0.92, 0.5, 0.925, 0.915, 0.93, 0.92];
        let stats = super::super::analyse(
            Metric::TestAccuracy,
            crate::metric::Direction::Max,
            &runs(&values),
            vec![],
            Some(0.01),
            Some(10_000),
            &[],
        );
        let outcomes = Outcomes::new(8, vec![], vec![]);
        let doc = StatsDocument::new("s".into(), Metric::TestAccuracy, stats, outcomes.clone());
        let text = serde_json::to_string(&doc).unwrap();
        let back: StatsDocument = serde_json::from_str(&text).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), text);
        let StatsBody::Stats(s) = &back.body else {
            panic!("statistics read back as none: {text}")
        };
        assert_eq!(s.black_swans[0].seed, 3);

        let none = Outcomes::new(0, vec![], vec![]);
        let empty = StatsDocument::new("s".into(), Metric::TestLoss, None, none);
        let text = serde_json::to_string(&empty).unwrap();
        let outcomes = r#""outcomes":{"finished":0,"converged":0,"diverged":0,"divergence_rate":null,"failed":0,"failure_causes":[],"diverged_seeds":[]}"#;
        assert_eq!(
            text,
            format!(r#"{{"sweep_id":"s",{outcomes},"metric":"test_loss","n":0}}"#)
        );
        let back: StatsDocument = serde_json::from_str(&text).unwrap();
        assert!(matches!(
            back.body,
            StatsBody::NoResultYet {
                metric: Metric::TestLoss,
                ..
            }
        ));
        let broken = format!(r#"{{"sweep_id":"s",{outcomes},"metric":"test_loss","n":3}}"#);
        assert!(serde_json::from_str::<StatsDocument>(&broken).is_err());

        // Single seeds: the Welch test is undefined (NaN), written as null and read back as NaN.
        let c =
            super::super::compare::compare(&[0.9, 0.9], &[0.8, 0.8], crate::metric::Direction::Max)
                .unwrap();
        let doc = ComparisonDocument {
            metric: Metric::TestAccuracy,
            sweep_a: "a".into(),
            sweep_b: "b".into(),
            comparison: c,
        };
        let text = serde_json::to_string(&doc).unwrap();
        let back: ComparisonDocument = serde_json::from_str(&text).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), text);
    }
}
