//! The per-seed numbers the statistics can describe: the known metrics, each a column of
//! `results` (and, but for `seconds`' different meaning there, of `epoch_metrics`), and the
//! custom metrics a `task = "command"` program reports, kept by name in the rows' `custom`
//! JSON object.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::domain::SeedResult;

/// A run's or an epoch's custom metrics, by name.
pub type CustomMetrics = BTreeMap<String, f64>;

/// The most custom metrics one epoch or result may carry.
pub const MAX_CUSTOM: usize = 32;

/// The longest custom metric name.
pub const NAME_MAX: usize = 40;

/// Keys of the command task's report lines that are not metrics.
const RESERVED: [&str; 7] = [
    "epoch",
    "final",
    "lr",
    "correct",
    "examples",
    "precision",
    "deterministic",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Metric {
    TestAccuracy,
    TestLoss,
    TrainAccuracy,
    TrainLoss,
    TestTop5,
    ValAccuracy,
    ValLoss,
    Seconds,
    /// A metric of the researcher's own program, by name ([`check_name`]).
    Custom(CustomName),
}

/// A custom metric's name, held inline so that a [`Metric`] stays `Copy`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CustomName {
    len: u8,
    bytes: [u8; NAME_MAX],
}

impl CustomName {
    pub fn as_str(&self) -> &str {
        // Only ever built from a checked ASCII name.
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or_default()
    }
}

impl fmt::Debug for CustomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl Metric {
    /// The known metrics.
    pub const ALL: [Metric; 8] = [
        Metric::TestAccuracy,
        Metric::TestLoss,
        Metric::TrainAccuracy,
        Metric::TrainLoss,
        Metric::TestTop5,
        Metric::ValAccuracy,
        Metric::ValLoss,
        Metric::Seconds,
    ];

    /// The metric's name everywhere (CLI, RPC, sweep files; a known metric's column).
    pub fn name(&self) -> &str {
        match self {
            Metric::Custom(name) => name.as_str(),
            known => known.column().unwrap_or_default(),
        }
    }

    /// Its column in `results` and `epoch_metrics`; `None` for a custom metric.
    pub fn column(self) -> Option<&'static str> {
        Some(match self {
            Metric::TestAccuracy => "test_accuracy",
            Metric::TestLoss => "test_loss",
            Metric::TrainAccuracy => "train_accuracy",
            Metric::TrainLoss => "train_loss",
            Metric::TestTop5 => "test_top5",
            Metric::ValAccuracy => "val_accuracy",
            Metric::ValLoss => "val_loss",
            Metric::Seconds => "seconds",
            Metric::Custom(_) => return None,
        })
    }

    /// A known metric by name.
    fn known(name: &str) -> Option<Metric> {
        Metric::ALL.into_iter().find(|m| m.column() == Some(name))
    }

    /// A custom metric by name, when the name is a valid one ([`check_name`]).
    pub fn custom(name: &str) -> Result<Metric, String> {
        check_name(name)?;
        let mut bytes = [0; NAME_MAX];
        bytes[..name.len()].copy_from_slice(name.as_bytes());
        Ok(Metric::Custom(CustomName {
            len: name.len() as u8,
            bytes,
        }))
    }

    /// The known metrics' names, listed for an error message.
    pub fn known_names() -> String {
        let names: Vec<&str> = Metric::ALL.iter().filter_map(|m| m.column()).collect();
        names.join(", ")
    }

    pub fn is_custom(self) -> bool {
        matches!(self, Metric::Custom(_))
    }

    /// Its value in a result, when the result has it.
    pub fn of(self, r: &SeedResult) -> Option<f64> {
        match self {
            Metric::TestAccuracy => r.test_accuracy,
            Metric::TestLoss => r.test_loss,
            Metric::TrainAccuracy => r.train_accuracy,
            Metric::TrainLoss => r.train_loss,
            Metric::TestTop5 => r.test_top5,
            Metric::ValAccuracy => r.val_accuracy,
            Metric::ValLoss => r.val_loss,
            Metric::Seconds => Some(r.seconds),
            Metric::Custom(name) => r.custom.get(name.as_str()).copied(),
        }
    }

    /// Whether the `epoch_values` table counts its values per epoch: the accuracies, fractions of
    /// a fixed set of examples, so they take few distinct values.
    pub fn counted(self) -> bool {
        matches!(
            self,
            Metric::TestAccuracy | Metric::TrainAccuracy | Metric::TestTop5 | Metric::ValAccuracy
        )
    }

    /// Whether epoch rows have it (`seconds` there is an epoch's, not a run's).
    pub fn per_epoch(self) -> bool {
        self != Metric::Seconds
    }
}

/// Which way a metric improves: what "best" and "worst" mean for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Direction {
    /// Higher is better (an accuracy, a reward, BLEU).
    #[default]
    Max,
    /// Lower is better (a loss, perplexity, an error rate, seconds).
    Min,
}

crate::domain::names!(Direction as "score direction" {
    Max => "max",
    Min => "min",
});

impl Direction {
    /// Which way a metric that is not its sweep's score improves: down for the losses and
    /// seconds, up for the accuracies and for a custom metric (a custom metric that improves
    /// downwards is best made the score, with `score_direction = "min"`).
    pub fn natural(metric: Metric) -> Direction {
        match metric {
            Metric::TestLoss | Metric::TrainLoss | Metric::ValLoss | Metric::Seconds => {
                Direction::Min
            }
            _ => Direction::Max,
        }
    }

    /// `(best, worst)` of a metric's `(min, max)`: the one rule that orders every pair of
    /// extremes (values, seeds, expected best-of-k) by the direction.
    pub fn best_worst<T>(self, min: T, max: T) -> (T, T) {
        match self {
            Direction::Max => (max, min),
            Direction::Min => (min, max),
        }
    }

    /// What a metric's name is followed by for people: " (lower is better)", or nothing.
    pub fn note(self) -> &'static str {
        match self {
            Direction::Max => "",
            Direction::Min => " (lower is better)",
        }
    }

    /// The side of the centre a lucky seed lies on.
    pub fn better_side(self) -> crate::stats::describe::Side {
        match self {
            Direction::Max => crate::stats::describe::Side::High,
            Direction::Min => crate::stats::describe::Side::Low,
        }
    }
}

/// Whether `name` may name a custom metric: lower-case ASCII letters, digits and underscores,
/// starting with a letter, at most [`NAME_MAX`] long, and neither a known metric nor a key the
/// report protocol reserves. The error says what to change.
pub fn check_name(name: &str) -> Result<(), String> {
    let well_formed = name.len() <= NAME_MAX
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !well_formed {
        let name: String = name.chars().take(NAME_MAX).collect();
        return Err(format!(
            "`{name}` is not a metric name: use lower-case letters, digits and `_`, starting with a letter, at most {NAME_MAX} characters"
        ));
    }
    if Metric::known(name).is_some() || RESERVED.contains(&name) {
        return Err(format!(
            "`{name}` is a known metric or a reserved key, not a custom metric"
        ));
    }
    Ok(())
}

/// Whether a report's custom metrics are acceptable: at most [`MAX_CUSTOM`], valid names,
/// finite values.
pub fn check_custom(custom: &CustomMetrics) -> Result<(), String> {
    if custom.len() > MAX_CUSTOM {
        return Err(format!(
            "{} custom metrics: at most {MAX_CUSTOM} per report",
            custom.len()
        ));
    }
    for (name, value) in custom {
        check_name(name)?;
        if !value.is_finite() {
            return Err(format!("custom metric `{name}` = {value}: must be finite"));
        }
    }
    Ok(())
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A known metric's name reads as it; any other valid name as a custom metric (which only
/// `task = "command"` sweeps have: the coordinator refuses it for the others).
impl FromStr for Metric {
    type Err = String;
    fn from_str(s: &str) -> Result<Metric, String> {
        if let Some(known) = Metric::known(s) {
            return Ok(known);
        }
        Metric::custom(s).map_err(|_| {
            format!(
                "unknown metric `{s}`: use one of {}, or the name of a custom metric a command sweep's program reports",
                Metric::known_names()
            )
        })
    }
}

impl From<Metric> for String {
    fn from(m: Metric) -> String {
        m.name().to_string()
    }
}

impl TryFrom<String> for Metric {
    type Error = String;
    fn try_from(s: String) -> Result<Metric, String> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_as_strings() {
        for m in Metric::ALL
            .into_iter()
            .chain([Metric::custom("bleu").unwrap()])
        {
            let json = serde_json::to_value(m).unwrap();
            assert_eq!(json.as_str(), Some(m.name()));
            assert_eq!(serde_json::from_value::<Metric>(json).unwrap(), m);
            assert_eq!(m.to_string().parse::<Metric>(), Ok(m));
        }
        assert_eq!(Metric::TestLoss.column(), Some("test_loss"));
        assert_eq!(Metric::custom("bleu").unwrap().column(), None);
    }

    #[test]
    fn custom_names_are_checked() {
        let longest = "a".repeat(NAME_MAX);
        assert!(Metric::custom(&longest).is_ok());
        for bad in [
            "",
            "Bleu",
            "1st",
            "a-b",
            "test_loss",
            "lr",
            "epoch",
            &"a".repeat(NAME_MAX + 1),
        ] {
            assert!(Metric::custom(bad).is_err(), "{bad}");
        }
        assert!(
            "Test Accuracy"
                .parse::<Metric>()
                .unwrap_err()
                .contains("test_accuracy")
        );
        let mut custom: CustomMetrics = (0..MAX_CUSTOM).map(|i| (format!("m{i}"), 1.0)).collect();
        assert!(check_custom(&custom).is_ok());
        custom.insert("extra".into(), 1.0);
        assert!(check_custom(&custom).unwrap_err().contains("at most 32"));
        let nan: CustomMetrics = [("ece".to_string(), f64::NAN)].into();
        assert!(check_custom(&nan).unwrap_err().contains("finite"));
    }
}
