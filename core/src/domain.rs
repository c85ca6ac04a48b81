//! Domain types shared by the store and the service layer. Proto types never get past the
//! service layer; SQL never gets past the store.

use crate::design::FactorSeeds;
pub use crate::metric::{CustomMetrics, Metric};
use crate::spec::{Precision, Task, TrainSettings};
use serde::Serialize;
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// One table of names for a closed set: `ALL`, `as_str` and `parse` from the same list, so the
/// name a state is written with and the one it is read back from cannot drift apart. With
/// `as "what"`, serde reads and writes the same names (sweep files, JSON), and an unknown name
/// is an error that lists the known ones.
macro_rules! names {
    ($ty:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }

            pub fn parse(s: &str) -> Option<$ty> {
                match s {
                    $($name => Some($ty::$variant),)+
                    _ => None,
                }
            }

            /// The known names, for error messages: "a, b or c".
            pub fn known() -> String {
                $crate::domain::either(&[$($name),+])
            }
        }
    };
    ($ty:ident as $what:literal { $($variant:ident => $name:literal),+ $(,)? }) => {
        $crate::domain::names!($ty { $($variant => $name),+ });

        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<$ty, D::Error> {
                let name = String::deserialize(d)?;
                $ty::parse(&name).ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "unknown {} `{name}`: use {}",
                        $what,
                        $ty::known()
                    ))
                })
            }
        }
    };
}
pub(crate) use names;

/// "a", "a or b", "a, b or c".
pub fn either(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [one] => one.to_string(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct SweepId(pub Uuid);

impl SweepId {
    pub fn new() -> Self {
        SweepId(Uuid::new_v4())
    }
}

impl Default for SweepId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for SweepId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for SweepId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Uuid::parse_str(s.trim())
            .map(SweepId)
            .map_err(|_| format!("`{s}` is not a sweep id: a sweep id is a UUID as printed by `coordinator sweep submit`"))
    }
}

/// Names one lease of one seed. `fence` grows with every new lease of the seed, so a write that
/// names an older fence comes from a worker that lost the seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseRef {
    pub sweep_id: SweepId,
    pub seed: i64,
    pub fence: i64,
}

impl fmt::Display for LeaseRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sweep {} seed {} fence {}",
            self.sweep_id, self.seed, self.fence
        )
    }
}

/// Where a seed stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SeedState {
    Pending,
    Leased,
    Done,
    Failed,
    /// Its sweep was cancelled before it finished.
    Cancelled,
}

names!(SeedState {
    Pending => "pending",
    Leased => "leased",
    Done => "done",
    Failed => "failed",
    Cancelled => "cancelled",
});

/// One lease of a seed and how it ended: a row of the `attempts` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub fence: i64,
    pub worker_id: String,
    /// UTC, ISO 8601.
    pub started_at: String,
    pub ended_at: Option<String>,
    pub outcome: crate::policy::AttemptOutcome,
    pub cause: Option<String>,
    /// Where the attempt's output is on its worker.
    pub log: Option<String>,
}

/// A seed's state and its newest attempts, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedHistory {
    pub state: SeedState,
    pub attempts: Vec<Attempt>,
}

/// Whether a sweep hands out leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SweepState {
    Active,
    /// No new leases; leases held run to completion.
    Paused,
    /// No new leases, held leases end at their next heartbeat; final.
    Cancelled,
}

names!(SweepState {
    Active => "active",
    Paused => "paused",
    Cancelled => "cancelled",
});

/// A lease handed to a worker, with what it needs to train.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub lease: LeaseRef,
    /// The lease's key: only the worker granted the lease receives it.
    pub key: LeaseKey,
    pub task: Task,
    pub dataset: String,
    pub train: TrainSettings,
    pub factors: FactorSeeds,
    pub seed_namespace: String,
    pub finetune: Option<crate::spec::finetune::FinetuneSpec>,
    pub command: Option<crate::spec::command::CommandSpec>,
}

/// The secret of one lease: 128 random bits that only the worker granted the lease receives and
/// that every write under it presents. The store keeps only its SHA-256; the coordinator
/// compares hashes in constant time.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct LeaseKey(pub [u8; 16]);

impl LeaseKey {
    pub fn random() -> LeaseKey {
        LeaseKey(rand::random())
    }
}

impl fmt::Debug for LeaseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LeaseKey(..)")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClaimOutcome {
    Leased(Box<Lease>),
    /// Nothing to lease now; `outstanding` seeds are still pending or leased.
    Empty {
        outstanding: u64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum CompleteOutcome {
    Recorded,
    /// The same lease had already recorded this result (a retried call).
    AlreadyRecorded,
}

/// One epoch's metrics as a worker reports them.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochRecord {
    pub epoch: u32,
    /// Absent when the run does not report them (a program of the researcher's own need
    /// report only its score).
    pub train_loss: Option<f64>,
    pub train_accuracy: Option<f64>,
    /// Absent for an epoch without an evaluation.
    pub test_loss: Option<f64>,
    pub test_accuracy: Option<f64>,
    /// Top-5 accuracy (task finetune-head).
    pub test_top5: Option<f64>,
    /// On the run's held-out validation images.
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    pub lr: Option<f64>,
    pub seconds: f64,
    /// The metrics of a command sweep's program that are not known ones.
    pub custom: CustomMetrics,
}

/// A seed's final result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeedResult {
    pub seed: i64,
    /// The known metrics a run reported (the built-in tasks report these four; a program of
    /// the researcher's own need report only its sweep's score).
    pub test_accuracy: Option<f64>,
    pub test_loss: Option<f64>,
    pub train_loss: Option<f64>,
    pub train_accuracy: Option<f64>,
    /// The epochs finished (for a diverged run: with finite metrics, their rows recorded).
    pub epochs: u32,
    /// Set when the run diverged: the epoch whose metrics were not finite. The seed is then
    /// done, its metrics those of its last finite epoch, and it counts in no score statistic.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diverged_epoch: Option<u32>,
    pub seconds: f64,
    pub worker_id: String,
    pub device: String,
    pub data_fingerprint: String,
    /// The precision used and whether the run repeats bit for bit, as the worker reports them.
    pub precision: Precision,
    pub deterministic: bool,
    /// Top-5 test accuracy (task finetune-head).
    pub test_top5: Option<f64>,
    /// On the run's held-out validation images.
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    /// The metrics of a command sweep's program that are not known ones.
    pub custom: CustomMetrics,
    /// Set by the store when recorded, from the seed's row.
    pub factors: Option<FactorSeeds>,
    /// Set by the store when recorded.
    pub finished_at: String,
    /// Which test examples the final evaluation got right (stored, not listed with results).
    #[serde(skip)]
    pub test_correct: Option<Correctness>,
}

/// The most test examples a correctness bitmap may cover: ImageNet's validation set is 50,000; the
/// bound keeps a sweep's per-example error counts (4 bytes an example, rewritten with each
/// result) and their exact sums in range.
pub const MAX_TEST_EXAMPLES: u32 = 500_000;

/// A run's per-example correctness on the test set: bit i of `bits` (least significant first
/// within each byte) for example i.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Correctness {
    pub examples: u32,
    pub bits: Vec<u8>,
}

impl Correctness {
    /// Checks the bitmap against its size and the accuracy it must agree with.
    pub fn new(examples: u32, bits: Vec<u8>, accuracy: f64) -> Result<Correctness, String> {
        if examples == 0 {
            return Err("test_correct was sent without test_examples".into());
        }
        if examples > MAX_TEST_EXAMPLES {
            return Err(format!(
                "test_examples is {examples}; per-example correctness is kept for at most {MAX_TEST_EXAMPLES} test examples: send none for a larger test set"
            ));
        }
        let want = (examples as usize).div_ceil(8);
        if bits.len() != want {
            return Err(format!(
                "test_correct has {} bytes; {examples} examples need {want}",
                bits.len()
            ));
        }
        let spare = want * 8 - examples as usize;
        if spare > 0 && bits[want - 1] >> (8 - spare) != 0 {
            return Err("test_correct has bits set past the last example".into());
        }
        let right: u32 = bits.iter().map(|b| b.count_ones()).sum();
        if (right as f64 / examples as f64 - accuracy).abs() > 0.5 / examples as f64 {
            return Err(format!(
                "test_correct marks {right} of {examples} examples right, but test_accuracy is {accuracy}"
            ));
        }
        Ok(Correctness { examples, bits })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepSummary {
    pub id: SweepId,
    pub name: String,
    pub task: Task,
    pub dataset: String,
    pub created_at: String,
    pub state: SweepState,
    pub priority: i32,
    pub total: u64,
    pub done: u64,
}

/// What the metrics endpoint reads from the database at each scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetCounts {
    /// Seeds per state of each sweep that is not cancelled: (sweep, name, state, count).
    pub seeds: Vec<(SweepId, String, SeedState, u64)>,
    /// Leases that ran out without a heartbeat, ever (attempts ended `expired`).
    pub expired_leases: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SeedCounts {
    pub pending: u64,
    pub leased: u64,
    /// Finished: converged or diverged.
    pub done: u64,
    /// Of the done seeds, those whose run diverged (`divergences`).
    pub diverged: u64,
    pub failed: u64,
    pub cancelled: u64,
}

impl SeedCounts {
    /// Records that `n` seeds are in `state`.
    pub fn set(&mut self, state: SeedState, n: u64) {
        let slot = match state {
            SeedState::Pending => &mut self.pending,
            SeedState::Leased => &mut self.leased,
            SeedState::Done => &mut self.done,
            SeedState::Failed => &mut self.failed,
            SeedState::Cancelled => &mut self.cancelled,
        };
        *slot = n;
    }
}

/// A sweep, its seed counts and the final test accuracy of every finished seed.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepProgress {
    pub summary: SweepSummary,
    pub counts: SeedCounts,
    /// The live aggregate of each metric the results have (none before the first result).
    pub aggregates: Vec<Aggregate>,
}

impl SweepProgress {
    /// The live aggregate of `metric`; `None` before a result has it.
    pub fn aggregate(&self, metric: Metric) -> Option<&Aggregate> {
        self.aggregates.iter().find(|a| a.metric == metric)
    }
}

/// One finished seed as the statistics see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub seed: i64,
    /// init, order, augment, split.
    pub factors: [i64; 4],
    pub value: f64,
}

/// A metric's live aggregate over a sweep's results, kept up to date as each result is
/// recorded (the `aggregates` table).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aggregate {
    pub metric: Metric,
    pub moments: crate::stats::Moments,
    pub min: f64,
    pub min_seed: i64,
    pub max: f64,
    pub max_seed: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each closed set's names read back as what they name, and match their serde names.
    #[test]
    fn names_round_trip() {
        let serde_name = |v: serde_json::Value| v.as_str().unwrap().to_string();
        for &s in SeedState::ALL {
            assert_eq!(SeedState::parse(s.as_str()), Some(s));
            assert_eq!(serde_name(serde_json::to_value(s).unwrap()), s.as_str());
        }
        for &s in SweepState::ALL {
            assert_eq!(SweepState::parse(s.as_str()), Some(s));
            assert_eq!(serde_name(serde_json::to_value(s).unwrap()), s.as_str());
        }
        assert_eq!(SeedState::parse("leased "), None);
    }

    #[test]
    fn correctness_must_agree_with_its_size_and_accuracy() {
        // 10 examples, 7 right: bits 0..7 of the first byte, none past bit 1 of the second.
        assert!(Correctness::new(10, vec![0x7f, 0x00], 0.7).is_ok());
        assert!(
            Correctness::new(10, vec![0x7f], 0.7)
                .unwrap_err()
                .contains("10 examples need 2")
        );
        assert!(
            Correctness::new(10, vec![0x7f, 0x04], 0.8)
                .unwrap_err()
                .contains("past the last")
        );
        assert!(
            Correctness::new(10, vec![0x7f, 0x00], 0.9)
                .unwrap_err()
                .contains("marks 7 of 10")
        );
        assert!(Correctness::new(0, vec![], 0.5).is_err());
    }
}
