//! The sweep file: parsed and validated once, at the edge, into a [`SweepSpec`] the rest of the
//! coordinator trusts. Every rejection names the key to change.

use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fmt;

/// The most seeds one sweep may hold; larger studies are several sweeps.
pub const MAX_SEEDS: u64 = 10_000_000;
/// The default number of attempts a seed gets before it ends `failed`.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid sweep file: {0}")]
pub struct SpecError(String);

fn invalid<T>(msg: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError(msg.into()))
}

/// What a worker trains. Only `resnet9` exists so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    Resnet9,
}

impl Task {
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Resnet9 => "resnet9",
        }
    }
}

/// The seeds of a sweep: a half-open range `start..end` or an explicit list, in submission order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedSet(Vec<i64>);

impl SeedSet {
    /// Parses `"A..B"` (end exclusive).
    pub fn parse_range(text: &str) -> Result<SeedSet, SpecError> {
        let Some((a, b)) = text.split_once("..") else {
            return invalid(format!(
                "`seeds` = \"{text}\" is not a range: write \"START..END\" (end exclusive), e.g. \"0..100\", or a list of integers"
            ));
        };
        let parse = |s: &str, which: &str| -> Result<i64, SpecError> {
            s.trim().parse::<i64>().map_err(|_| {
                SpecError(format!(
                    "`seeds` = \"{text}\": the {which} `{}` is not a non-negative integer",
                    s.trim()
                ))
            })
        };
        let (start, end) = (parse(a, "start")?, parse(b, "end")?);
        if start < 0 {
            return invalid(format!("`seeds` = \"{text}\": seeds must be non-negative"));
        }
        if end <= start {
            return invalid(format!(
                "`seeds` = \"{text}\" is empty or inverted: the end is exclusive and must exceed the start"
            ));
        }
        if (end - start) as u64 > MAX_SEEDS {
            return invalid(format!(
                "`seeds` = \"{text}\" holds {} seeds; one sweep holds at most {MAX_SEEDS}",
                end - start
            ));
        }
        Ok(SeedSet((start..end).collect()))
    }

    pub fn from_list(seeds: Vec<i64>) -> Result<SeedSet, SpecError> {
        if seeds.is_empty() {
            return invalid("`seeds` is an empty list: give at least one seed");
        }
        if seeds.len() as u64 > MAX_SEEDS {
            return invalid(format!(
                "`seeds` lists {} seeds; one sweep holds at most {MAX_SEEDS}",
                seeds.len()
            ));
        }
        let mut seen = HashSet::with_capacity(seeds.len());
        for &s in &seeds {
            if s < 0 {
                return invalid(format!("`seeds` contains {s}: seeds must be non-negative"));
            }
            if !seen.insert(s) {
                return invalid(format!(
                    "`seeds` lists seed {s} twice: each seed may appear once"
                ));
            }
        }
        Ok(SeedSet(seeds))
    }

    pub fn as_slice(&self) -> &[i64] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// How each seed is trained. Defaults follow Page's DAWNBench ResNet-9 recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSettings {
    #[serde(default = "defaults::epochs")]
    pub epochs: u32,
    #[serde(default = "defaults::batch_size")]
    pub batch_size: u32,
    /// Channel multiplier: 1.0 is the full 6,573,120-parameter network.
    #[serde(default = "defaults::width")]
    pub width: f64,
    /// Peak learning rate of the piecewise-linear schedule 0 -> lr (at `lr_peak_epoch`) -> 0.
    #[serde(default = "defaults::lr")]
    pub lr: f64,
    /// Where the schedule peaks; when absent, 5/24 of `epochs` (Page's 5 of 24). Always set after
    /// [`SweepSpec::parse`].
    #[serde(default)]
    pub lr_peak_epoch: Option<f64>,
    #[serde(default = "defaults::momentum")]
    pub momentum: f64,
    #[serde(default = "defaults::nesterov")]
    pub nesterov: bool,
    #[serde(default = "defaults::weight_decay")]
    pub weight_decay: f64,
    #[serde(default)]
    pub label_smoothing: f64,
    /// Random-crop padding in pixels (0 turns cropping off).
    #[serde(default = "defaults::crop_padding")]
    pub crop_padding: u32,
    /// Random horizontal flip.
    #[serde(default = "defaults::flip")]
    pub flip: bool,
}

mod defaults {
    pub fn epochs() -> u32 {
        24
    }
    pub fn batch_size() -> u32 {
        512
    }
    pub fn width() -> f64 {
        1.0
    }
    pub fn lr() -> f64 {
        0.4
    }
    pub fn momentum() -> f64 {
        0.9
    }
    pub fn nesterov() -> bool {
        true
    }
    pub fn weight_decay() -> f64 {
        5e-4
    }
    pub fn crop_padding() -> u32 {
        4
    }
    pub fn flip() -> bool {
        true
    }
}

impl Default for TrainSettings {
    fn default() -> Self {
        toml::from_str("").expect("every train setting has a default")
    }
}

impl TrainSettings {
    pub fn peak_epoch(&self) -> f64 {
        self.lr_peak_epoch
            .unwrap_or(self.epochs as f64 * 5.0 / 24.0)
    }

    fn validate(&self) -> Result<(), SpecError> {
        let finite = |key: &str, v: f64| -> Result<(), SpecError> {
            if v.is_finite() {
                Ok(())
            } else {
                invalid(format!("`train.{key}` = {v} is not a finite number"))
            }
        };
        if self.epochs == 0 || self.epochs > 10_000 {
            return invalid(format!(
                "`train.epochs` = {}: give between 1 and 10000 epochs",
                self.epochs
            ));
        }
        if self.batch_size == 0 || self.batch_size > 65_536 {
            return invalid(format!(
                "`train.batch_size` = {}: give between 1 and 65536",
                self.batch_size
            ));
        }
        finite("width", self.width)?;
        if !(self.width > 0.0 && self.width <= 8.0) || (64.0 * self.width).round() < 1.0 {
            return invalid(format!(
                "`train.width` = {}: the channel multiplier must be in (0, 8] and leave at least one channel (width >= 1/64)",
                self.width
            ));
        }
        finite("lr", self.lr)?;
        if self.lr < 0.0 {
            return invalid(format!(
                "`train.lr` = {}: the learning rate must be >= 0",
                self.lr
            ));
        }
        let peak = self.peak_epoch();
        finite("lr_peak_epoch", peak)?;
        if peak < 0.0 || peak > self.epochs as f64 {
            return invalid(format!(
                "`train.lr_peak_epoch` = {peak}: must lie between 0 and `train.epochs` ({})",
                self.epochs
            ));
        }
        finite("momentum", self.momentum)?;
        if !(0.0..1.0).contains(&self.momentum) {
            return invalid(format!(
                "`train.momentum` = {}: must be in [0, 1)",
                self.momentum
            ));
        }
        if self.nesterov && self.momentum == 0.0 {
            return invalid("`train.nesterov` = true needs `train.momentum` > 0");
        }
        finite("weight_decay", self.weight_decay)?;
        if self.weight_decay < 0.0 {
            return invalid(format!(
                "`train.weight_decay` = {}: must be >= 0",
                self.weight_decay
            ));
        }
        finite("label_smoothing", self.label_smoothing)?;
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return invalid(format!(
                "`train.label_smoothing` = {}: must be in [0, 1)",
                self.label_smoothing
            ));
        }
        if self.crop_padding > 16 {
            return invalid(format!(
                "`train.crop_padding` = {}: at most 16 pixels",
                self.crop_padding
            ));
        }
        Ok(())
    }
}

/// A validated sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepSpec {
    pub name: String,
    pub task: Task,
    pub dataset: String,
    pub seeds: SeedSet,
    pub max_attempts: u32,
    /// Retry backoff: see [`RetrySettings`].
    pub retry: RetrySettings,
    /// Higher-priority sweeps are served first; within a priority, older sweeps first.
    pub priority: i32,
    pub train: TrainSettings,
}

/// A failed attempt's seed waits `base * 2^(failures - 1)`, at most `max`, times a random factor in
/// [0.5, 1.5), before it can be leased again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetrySettings {
    pub base_seconds: f64,
    pub max_seconds: f64,
}

impl RetrySettings {
    pub const DEFAULT: RetrySettings = RetrySettings {
        base_seconds: 10.0,
        max_seconds: 600.0,
    };

    /// The wait before the next attempt after `failures` failed attempts, with `jitter` in [0, 1).
    pub fn backoff_seconds(&self, failures: u32, jitter: f64) -> f64 {
        let doubled = self.base_seconds * 2f64.powi(failures.saturating_sub(1).min(60) as i32);
        doubled.min(self.max_seconds) * (0.5 + jitter)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSweep {
    name: String,
    task: String,
    dataset: String,
    seeds: RawSeeds,
    max_attempts: Option<u32>,
    #[serde(default)]
    priority: i32,
    retry_backoff_seconds: Option<f64>,
    retry_backoff_max_seconds: Option<f64>,
    #[serde(default)]
    train: TrainSettings,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawSeeds {
    Range(String),
    List(Vec<i64>),
}

impl SweepSpec {
    /// Parses and validates a sweep file's TOML text.
    pub fn parse(text: &str) -> Result<SweepSpec, SpecError> {
        let raw: RawSweep = toml::from_str(text).map_err(|e| SpecError(toml_message(text, &e)))?;
        let name = raw.name.trim().to_string();
        if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
            return invalid("`name` must be 1 to 200 printable characters");
        }
        let task = match raw.task.as_str() {
            "resnet9" => Task::Resnet9,
            other => {
                return invalid(format!(
                    "`task` = \"{other}\" is not a known task: use \"resnet9\""
                ));
            }
        };
        let dataset = raw.dataset;
        if dataset.is_empty()
            || dataset.len() > 64
            || !dataset
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            || dataset.starts_with('-')
        {
            return invalid(format!(
                "`dataset` = \"{dataset}\": a dataset name is 1 to 64 letters, digits, '-' or '_' (e.g. \"cifar10\" or \"synthetic\")"
            ));
        }
        let seeds = match raw.seeds {
            RawSeeds::Range(r) => SeedSet::parse_range(&r)?,
            RawSeeds::List(l) => SeedSet::from_list(l)?,
        };
        let max_attempts = raw.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
        if max_attempts == 0 || max_attempts > 100 {
            return invalid(format!(
                "`max_attempts` = {max_attempts}: give between 1 and 100"
            ));
        }
        let retry = RetrySettings {
            base_seconds: raw
                .retry_backoff_seconds
                .unwrap_or(RetrySettings::DEFAULT.base_seconds),
            max_seconds: raw
                .retry_backoff_max_seconds
                .unwrap_or(RetrySettings::DEFAULT.max_seconds),
        };
        for (key, v) in [
            ("retry_backoff_seconds", retry.base_seconds),
            ("retry_backoff_max_seconds", retry.max_seconds),
        ] {
            if !(0.0..=86_400.0).contains(&v) {
                return invalid(format!("`{key}` = {v}: give seconds between 0 and 86400"));
            }
        }
        if retry.max_seconds < retry.base_seconds {
            return invalid(format!(
                "`retry_backoff_max_seconds` = {} is below `retry_backoff_seconds` = {}",
                retry.max_seconds, retry.base_seconds
            ));
        }
        if !(-1000..=1000).contains(&raw.priority) {
            return invalid(format!(
                "`priority` = {}: give between -1000 and 1000",
                raw.priority
            ));
        }
        let mut train = raw.train;
        train.validate()?;
        train.lr_peak_epoch = Some(train.peak_epoch());
        Ok(SweepSpec {
            name,
            task,
            dataset,
            seeds,
            max_attempts,
            retry,
            priority: raw.priority,
            train,
        })
    }

    /// The resolved configuration as stored in `sweeps.config`.
    pub fn config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "task": self.task.as_str(),
            "dataset": self.dataset,
            "seeds": self.seeds_description(),
            "max_attempts": self.max_attempts,
            "priority": self.priority,
            "retry_backoff_seconds": self.retry.base_seconds,
            "retry_backoff_max_seconds": self.retry.max_seconds,
            "train": self.train,
        })
    }

    fn seeds_description(&self) -> serde_json::Value {
        let s = self.seeds.as_slice();
        let contiguous = s.windows(2).all(|w| w[1] == w[0] + 1);
        if contiguous && s.len() > 1 {
            serde_json::Value::String(format!("{}..{}", s[0], s[s.len() - 1] + 1))
        } else {
            serde_json::json!(s)
        }
    }
}

/// toml's message, with the line it points at and the text there, and where the keys are documented.
fn toml_message(text: &str, e: &toml::de::Error) -> String {
    let at = e
        .span()
        .map(|span| {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let snippet = text.get(span.clone()).unwrap_or("").trim();
            if snippet.is_empty() || snippet.len() > 60 {
                format!(" (line {line})")
            } else {
                format!(" (line {line}: `{snippet}`)")
            }
        })
        .unwrap_or_default();
    format!(
        "{}{at}; see README, \"Sweep files\", for the keys",
        e.message().trim_end()
    )
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
name = "t"
task = "resnet9"
dataset = "synthetic"
seeds = "0..6"
[train]
epochs = 2
batch_size = 64
width = 0.25
"#;

    fn err(text: &str) -> String {
        SweepSpec::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn parses_a_range_and_fills_defaults() {
        let s = SweepSpec::parse(OK).unwrap();
        assert_eq!(s.seeds.as_slice(), &[0, 1, 2, 3, 4, 5]);
        assert_eq!(s.train.epochs, 2);
        assert_eq!(s.train.momentum, 0.9);
        assert_eq!(s.max_attempts, 3);
        assert_eq!(s.train.lr_peak_epoch, Some(2.0 * 5.0 / 24.0));
        assert_eq!(s.config_json()["seeds"], "0..6");
    }

    #[test]
    fn parses_a_list() {
        let s = SweepSpec::parse(&OK.replace("\"0..6\"", "[7, 3, 11]")).unwrap();
        assert_eq!(s.seeds.as_slice(), &[7, 3, 11]);
    }

    #[test]
    fn rejects_bad_files_naming_the_key() {
        assert!(err(&OK.replace("0..6", "6..6")).contains("`seeds`"));
        assert!(err(&OK.replace("0..6", "9..3")).contains("inverted"));
        assert!(err(&OK.replace("0..6", "a..3")).contains("`seeds`"));
        assert!(err(&OK.replace("\"0..6\"", "[1, 2, 1]")).contains("twice"));
        assert!(err(&OK.replace("\"0..6\"", "[]")).contains("empty"));
        assert!(err(&OK.replace("epochs = 2", "epochs = 0")).contains("`train.epochs`"));
        assert!(err(&OK.replace("width = 0.25", "width = -1.0")).contains("`train.width`"));
        assert!(err(&OK.replace("epochs = 2", "epochs = 2\nepoch = 3")).contains("epoch"));
        assert!(err(&OK.replace("name = \"t\"", "name = \"t\"\ncolour = 1")).contains("colour"));
        assert!(err(&OK.replace("resnet9", "resnet18")).contains("`task`"));
        let dup = err(&OK.replace("epochs = 2", "epochs = 2\nepochs = 3"));
        assert!(
            dup.contains("duplicate") && dup.contains("line 8") && dup.contains("epochs"),
            "{dup}"
        );
        assert!(err(&OK.replace("\"synthetic\"", "\"../etc\"")).contains("`dataset`"));
        assert!(err("name = ").contains("invalid sweep file"));
        assert!(err(&OK.replace("name = \"t\"\n", "")).contains("name"));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let r = RetrySettings {
            base_seconds: 10.0,
            max_seconds: 60.0,
        };
        assert_eq!(r.backoff_seconds(1, 0.5), 10.0);
        assert_eq!(r.backoff_seconds(2, 0.5), 20.0);
        assert_eq!(r.backoff_seconds(5, 0.5), 60.0);
        assert_eq!(r.backoff_seconds(2, 0.0), 10.0);
        assert!(
            err(&OK.replace("name = \"t\"", "name = \"t\"\nretry_backoff_seconds = -1"))
                .contains("retry_backoff_seconds")
        );
        assert!(
            err(&OK.replace("name = \"t\"", "name = \"t\"\npriority = 5000"))
                .contains("`priority`")
        );
    }

    #[test]
    fn rejects_huge_ranges() {
        assert!(err(&OK.replace("0..6", "0..20000000")).contains("at most"));
    }
}
