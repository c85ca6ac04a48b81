//! The reporting protocol of task `command` (README, "The reporting protocol"): the JSON lines a
//! program appends to the file named in `SEEDSWEEP_METRICS_FILE`, read as the file grows, each
//! judged; and the run they add up to. Whatever the file holds, a bad line is the program's
//! failure (its first bytes quoted), never the host's.

use crate::run::{Correct, EpochMetrics, Trained};
use base64::Engine;
use seedsweep_core::metric::CustomMetrics;
use seedsweep_core::spec::Precision;
use serde_json::{Map, Value};
use std::io::Read;
use std::path::Path;

/// The longest report line read; a longer one fails the run.
pub const MAX_LINE: usize = 1 << 20;
/// The epoch metrics that have columns of their own; any other name is a custom metric.
const EPOCH_METRICS: [&str; 9] = [
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "test_top5",
    "val_loss",
    "val_accuracy",
    "lr",
    "seconds",
];

/// The trained run from its reports: its epochs, and the final line's bitmap and settings. It
/// must carry the sweep's `score`.
pub fn finish(
    history: Vec<EpochMetrics>,
    last: Option<Final>,
    score: &str,
) -> Result<Trained, String> {
    let Some(final_epoch) = history.last() else {
        return Err("the program exited without reporting an epoch".into());
    };
    let final_ = last.unwrap_or(Final {
        metrics: Vec::new(),
        custom: CustomMetrics::new(),
        correct: None,
        precision: Precision::Fp32,
        deterministic: false,
    });
    let custom_at_last = |name: &str| final_epoch.custom.get(name).copied();
    let known = final_
        .metrics
        .iter()
        .map(|(n, v)| (n, v, epoch_metric(final_epoch, n)));
    let custom = final_
        .custom
        .iter()
        .filter_map(|(n, v)| Some((n, v, Some(custom_at_last(n)?))));
    for (name, value, at_last) in known.chain(custom) {
        let agrees = at_last.is_some_and(|v| seedsweep_core::policy::same_value(*value, v));
        if !agrees {
            return Err(format!(
                "the final {name} = {value} is not epoch {}'s ({}): report the final evaluation as the last epoch",
                final_epoch.epoch,
                at_last.map_or("not reported".into(), |v| v.to_string())
            ));
        }
    }
    if final_.correct.is_some() && final_epoch.test_accuracy.is_none() {
        return Err(format!(
            "the final line's `correct` needs the test_accuracy it counts: report test_accuracy on the last epoch ({})",
            final_epoch.epoch
        ));
    }
    let custom: CustomMetrics = final_
        .custom
        .into_iter()
        .filter(|(name, _)| custom_at_last(name).is_none())
        .collect();
    let scored = score == "seconds"
        || epoch_metric(final_epoch, score).is_some()
        || custom_at_last(score).is_some()
        || custom.contains_key(score);
    if !scored {
        return Err(format!(
            "the program reported no `{score}`, the sweep's score: report it on the last epoch or the final line"
        ));
    }
    Ok(Trained {
        history,
        custom,
        test_correct: final_.correct,
        precision: final_.precision,
        deterministic: final_.deterministic,
        resumed_from: 0,
        timing: Default::default(),
        diverged: None,
    })
}

fn epoch_metric(m: &EpochMetrics, name: &str) -> Option<f64> {
    match name {
        "train_loss" => m.train_loss,
        "train_accuracy" => m.train_accuracy,
        "test_loss" => m.test_loss,
        "test_accuracy" => m.test_accuracy,
        "test_top5" => m.test_top5,
        "val_loss" => m.val_loss,
        "val_accuracy" => m.val_accuracy,
        "lr" => m.lr,
        _ => None,
    }
}

/// One line of the report file, understood.
pub enum Report {
    Epoch(EpochMetrics),
    Final(Final),
    /// The run diverged in `epoch`: a line with a metric that is not finite (`NaN`,
    /// `Infinity`, as Python's json writes them, or those words as strings), or
    /// `"diverged": true`. A final line's divergence is in the last epoch (the first when none).
    Diverged {
        epoch: u32,
    },
}

/// The final line: its metrics (which must be the last epoch's, but for custom metrics the last
/// epoch did not report) and what only it carries.
pub struct Final {
    metrics: Vec<(String, f64)>,
    custom: CustomMetrics,
    correct: Option<Correct>,
    precision: Precision,
    deterministic: bool,
}

/// Parses one report line; `seen` epochs came before it. The error quotes the line.
pub fn parse_line(line: &str, seen: u32) -> Result<Report, String> {
    let quoted = if line.len() > 200 {
        format!("{}...", &line[..line.floor_char_boundary(200)])
    } else {
        line.to_string()
    };
    let bad = |why: String| format!("bad metrics line {}: {why}: {quoted}", seen + 1);
    let parsed = serde_json::from_str::<Value>(line)
        .or_else(|_| serde_json::from_str::<Value>(&quote_non_finite(line)));
    let Ok(Value::Object(mut obj)) = parsed else {
        return Err(bad("not a JSON object".into()));
    };
    let said_diverged = match obj.remove("diverged") {
        None | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(other) => return Err(bad(format!("`diverged` = {other}: use true or false"))),
    };
    if obj.remove("final").is_some() {
        if said_diverged || has_non_finite(&obj) {
            return Ok(Report::Diverged { epoch: seen.max(1) });
        }
        return parse_final(obj).map(Report::Final).map_err(bad);
    }
    let epoch = match obj.remove("epoch") {
        Some(Value::Number(n)) => n.as_u64().filter(|e| (1..=u64::from(u32::MAX)).contains(e)),
        _ => None,
    }
    .ok_or_else(|| {
        bad("`epoch` must be a whole number from 1 (or the line `\"final\": true`)".into())
    })?;
    if epoch != u64::from(seen) + 1 {
        return Err(bad(format!(
            "epoch {epoch} after {seen} epochs: report epochs 1, 2, 3, ... in order"
        )));
    }
    if said_diverged || has_non_finite(&obj) {
        return Ok(Report::Diverged {
            epoch: epoch as u32,
        });
    }
    let (numbers, custom) = numbers(obj).map_err(bad)?;
    let get = |name: &str| numbers.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
    Ok(Report::Epoch(EpochMetrics {
        epoch: epoch as u32,
        train_loss: get("train_loss"),
        train_accuracy: get("train_accuracy"),
        test_loss: get("test_loss"),
        test_accuracy: get("test_accuracy"),
        test_top5: get("test_top5"),
        val_loss: get("val_loss"),
        val_accuracy: get("val_accuracy"),
        lr: get("lr"),
        seconds: get("seconds").unwrap_or(f64::NAN),
        custom,
    }))
}

fn parse_final(mut obj: Map<String, Value>) -> Result<Final, String> {
    let precision = match obj.remove("precision") {
        None => Precision::Fp32,
        Some(Value::String(p)) => Precision::parse(&p)
            .ok_or_else(|| format!("`precision` = \"{p}\": use {}", Precision::known()))?,
        Some(other) => return Err(format!("`precision` = {other}: use {}", Precision::known())),
    };
    let deterministic = match obj.remove("deterministic") {
        None => false,
        Some(Value::Bool(b)) => b,
        Some(other) => return Err(format!("`deterministic` = {other}: use true or false")),
    };
    let correct = match (obj.remove("correct"), obj.remove("examples")) {
        (None, None) => None,
        (Some(Value::String(bits)), Some(Value::Number(n))) => {
            let examples = n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| *n > 0)
                .ok_or("`examples` must be a whole number from 1")?;
            let bits = base64::engine::general_purpose::STANDARD
                .decode(bits)
                .map_err(|e| format!("`correct` is not base64: {e}"))?;
            if bits.len() != (examples as usize).div_ceil(8) {
                return Err(format!(
                    "`correct` holds {} bytes, but {examples} examples need {}",
                    bits.len(),
                    (examples as usize).div_ceil(8)
                ));
            }
            Some(Correct { examples, bits })
        }
        _ => return Err("`correct` (base64 of the bitmap) and `examples` go together".into()),
    };
    let (metrics, custom) = numbers(obj)?;
    Ok(Final {
        metrics,
        custom,
        correct,
        precision,
        deterministic,
    })
}

/// The words for values that are not finite numbers: bare (Python's json, JavaScript) or quoted.
const NON_FINITE: [&str; 3] = ["NaN", "Infinity", "-Infinity"];

/// Whether a metric of the line is not a finite number: one of [`NON_FINITE`] (quoted by
/// [`quote_non_finite`] when bare), or a number past f64's range.
fn has_non_finite(obj: &Map<String, Value>) -> bool {
    obj.values().any(|v| match v {
        Value::String(s) => NON_FINITE.contains(&s.as_str()),
        Value::Number(n) => n.as_f64().is_none_or(|x| !x.is_finite()),
        _ => false,
    })
}

/// `line` with the bare words `NaN`, `Infinity` and `-Infinity` outside strings quoted, so that
/// a JSON parser reads them (as strings).
fn quote_non_finite(line: &str) -> String {
    let (mut out, mut rest, mut in_string, mut escaped) = (String::new(), line, false, false);
    while let Some(c) = rest.chars().next() {
        if !in_string && let Some(word) = NON_FINITE.iter().find(|w| rest.starts_with(**w)) {
            out.push('"');
            out.push_str(word);
            out.push('"');
            rest = &rest[word.len()..];
            continue;
        }
        match (in_string, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (_, false, '"') => in_string = !in_string,
            _ => {}
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The line's remaining keys, finite numbers all: the known metrics, and the custom ones.
fn numbers(obj: Map<String, Value>) -> Result<(Vec<(String, f64)>, CustomMetrics), String> {
    let (mut known, mut custom) = (Vec::new(), CustomMetrics::new());
    for (name, v) in obj {
        let Some(x) = v.as_f64().filter(|x| x.is_finite()) else {
            return Err(format!(
                "`{name}` = {v}: a metric is a finite number (or NaN or Infinity: the run diverged)"
            ));
        };
        if EPOCH_METRICS.contains(&name.as_str()) {
            known.push((name, x));
        } else {
            seedsweep_core::metric::check_name(&name)?;
            custom.insert(name, x);
        }
    }
    seedsweep_core::metric::check_custom(&custom)?;
    Ok((known, custom))
}

/// The report file, read as it grows: complete lines only, each at most [`MAX_LINE`] bytes.
pub struct Reports {
    file: std::fs::File,
    lines: super::output::Lines,
    /// Lines read so far (to name a bad one).
    read: usize,
}

/// What reading the reports found wrong: the file itself (the host's) or a line (the program's).
pub enum Unreadable {
    Host(std::io::Error),
    Line(String),
}

impl Reports {
    pub fn new(path: &Path) -> std::io::Result<Reports> {
        Ok(Reports {
            file: std::fs::File::open(path)?,
            lines: super::output::Lines::new(MAX_LINE + 1, b"\n"),
            read: 0,
        })
    }

    /// The complete lines written since the last call, blank ones left out.
    pub fn new_lines(&mut self) -> Result<Vec<String>, Unreadable> {
        let mut raw: Vec<(Vec<u8>, bool)> = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Unreadable::Host(e)),
            };
            self.lines
                .push(&buf[..n], &mut |l: &[u8], cut| raw.push((l.to_vec(), cut)));
        }
        let mut lines = Vec::new();
        for (line, cut) in raw {
            self.read += 1;
            let body = line.strip_suffix(b"\n").unwrap_or(&line);
            if cut || body.len() > MAX_LINE {
                return Err(Unreadable::Line(format!(
                    "bad metrics line {}: longer than {MAX_LINE} bytes: {}",
                    self.read,
                    quote(body)
                )));
            }
            let text = std::str::from_utf8(body).map_err(|e| {
                Unreadable::Line(format!(
                    "bad metrics line {}: not UTF-8 text ({e}): {}",
                    self.read,
                    quote(body)
                ))
            })?;
            if !text.trim().is_empty() {
                lines.push(text.trim_end().to_string());
            }
        }
        Ok(lines)
    }
}

/// The first bytes of a bad line, as a cause quotes them: printable ASCII as it is, anything
/// else escaped.
pub fn quote(line: &[u8]) -> String {
    let head = &line[..line.len().min(200)];
    let more = if line.len() > head.len() { "..." } else { "" };
    let text: String = head
        .iter()
        .map(|b| match b {
            b' '..=b'~' => char::from(*b).to_string(),
            _ => format!("\\x{b:02x}"),
        })
        .collect();
    format!("{text}{more}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines of `bytes` written to a reports file, as the worker reads them.
    fn read_reports(bytes: &[u8]) -> Result<Vec<String>, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        std::fs::write(&path, bytes).unwrap();
        match Reports::new(&path).unwrap().new_lines() {
            Ok(lines) => Ok(lines),
            Err(Unreadable::Line(why)) => Err(why),
            Err(Unreadable::Host(e)) => panic!("a host problem: {e}"),
        }
    }

    #[test]
    fn bad_bytes_and_long_lines_are_the_programs_failure_quoted() {
        assert_eq!(
            read_reports(b"{\"a\": 1}\n\n{\"b\"").unwrap(),
            ["{\"a\": 1}"]
        );
        let utf8 = read_reports(b"{}\n{\"epoch\": 1, \"x\xff\": 2}\n").unwrap_err();
        assert!(
            utf8.starts_with("bad metrics line 2: not UTF-8 text")
                && utf8.ends_with(r#": {"epoch": 1, "x\xff": 2}"#),
            "{utf8}"
        );
        let mut long = vec![b'7'; MAX_LINE + 10];
        long.push(b'\n');
        let long = read_reports(&long).unwrap_err();
        assert!(long.contains("longer than 1048576 bytes: 777"), "{long}");
        assert!(long.len() < 400, "quotes the start only");
        // A line of exactly the limit is read.
        let mut fits = vec![b' '; MAX_LINE - 2];
        fits.splice(0..0, *b"{}");
        fits.push(b'\n');
        assert_eq!(read_reports(&fits).unwrap().len(), 1);
    }

    #[test]
    fn parses_epochs_and_the_final_line() {
        let Report::Epoch(e) = parse_line(
            r#"{"epoch": 1, "train_loss": 0.5, "train_accuracy": 0.8, "lr": 0.1, "test_accuracy": 0.7}"#,
            0,
        )
        .unwrap() else {
            panic!("an epoch")
        };
        assert_eq!(
            (e.epoch, e.test_accuracy, e.test_loss),
            (1, Some(0.7), None)
        );
        let Report::Final(f) = parse_line(
            r#"{"final": true, "test_accuracy": 0.7, "examples": 10, "correct": "/wM=", "precision": "bf16"}"#,
            1,
        )
        .unwrap() else {
            panic!("the final line")
        };
        let c = f.correct.unwrap();
        assert_eq!((c.examples, c.bits), (10, vec![0xff, 0x03]));
        assert_eq!(f.precision, Precision::Bf16);
    }

    #[test]
    fn refuses_bad_lines_quoting_them() {
        let err = |line: &str, seen| match parse_line(line, seen) {
            Err(e) => e,
            Ok(_) => panic!("accepted {line}"),
        };
        assert!(err("loss=0.5", 0).contains("not a JSON object: loss=0.5"));
        assert!(
            err(
                r#"{"epoch": 2, "train_loss": 1, "train_accuracy": 0, "lr": 1}"#,
                0
            )
            .contains("epoch 2 after 0 epochs")
        );
        assert!(
            err(
                r#"{"epoch": 1, "train_loss": "x", "train_accuracy": 0, "lr": 1}"#,
                0
            )
            .contains("finite number")
        );
        assert!(err(r#"{"final": true, "examples": 10, "correct": "/w=="}"#, 1).contains("need 2"));
        assert!(
            err(
                r#"{"epoch": 1, "train_loss": 1, "train_accuracy": 0, "lr": 1, "Test-ECE": 0.1}"#,
                0
            )
            .contains("`Test-ECE` is not a metric name")
        );
        assert!(err(r#"{"final": true, "ece": null}"#, 1).contains("finite number"));
    }

    /// A value that is not finite, however it is spelled, or an explicit `"diverged": true`
    /// ends the run as diverged in that epoch (the last one for the final line); a word in a
    /// string that only looks like one is a string still.
    #[test]
    fn a_non_finite_value_or_diverged_is_a_divergence() {
        let diverged = |line: &str, seen| match parse_line(line, seen) {
            Ok(Report::Diverged { epoch }) => epoch,
            Ok(_) => panic!("not a divergence: {line}"),
            Err(e) => panic!("refused {line}: {e}"),
        };
        assert_eq!(diverged(r#"{"epoch": 3, "train_loss": NaN}"#, 2), 3);
        assert_eq!(diverged(r#"{"epoch": 1, "bleu": -Infinity}"#, 0), 1);
        assert_eq!(diverged(r#"{"epoch": 2, "loss": Infinity, "x": 1}"#, 1), 2);
        assert_eq!(diverged(r#"{"epoch": 1, "train_loss": "NaN"}"#, 0), 1);
        assert_eq!(diverged(r#"{"epoch": 4, "diverged": true}"#, 3), 4);
        assert_eq!(diverged(r#"{"final": true, "test_accuracy": NaN}"#, 5), 5);
        assert_eq!(diverged(r#"{"final": true, "diverged": true}"#, 0), 1);
        // Inside a string the word is text: here a bad metric, not a divergence.
        assert!(parse_line(r#"{"epoch": 1, "note": "NaN here"}"#, 0).is_err());
        assert!(parse_line(r#"{"epoch": 1, "diverged": "yes"}"#, 0).is_err());
        let Ok(Report::Epoch(e)) = parse_line(r#"{"epoch": 1, "diverged": false, "loss": 1}"#, 0)
        else {
            panic!("diverged: false is an ordinary epoch")
        };
        assert_eq!(e.custom.get("loss"), Some(&1.0));
        assert_eq!(
            quote_non_finite(r#"{"a\"NaN": NaN, "b": [Infinity, -Infinity]}"#),
            r#"{"a\"NaN": "NaN", "b": ["Infinity", "-Infinity"]}"#
        );
    }

    /// Custom metrics ride on epochs and the final line; the final line's must agree with the
    /// last epoch's where it has them, and the rest are the result's alone.
    #[test]
    fn custom_metrics_of_epochs_and_the_result() {
        let line = r#"{"epoch": 1, "train_loss": 1, "train_accuracy": 0.5, "lr": 0.1, "test_accuracy": 0.5, "test_loss": 1, "ece": 0.2}"#;
        let Ok(Report::Epoch(e)) = parse_line(line, 0) else {
            panic!("an epoch")
        };
        assert_eq!(e.custom, [("ece".to_string(), 0.2)].into());
        let final_line = |text: &str| match parse_line(text, 1) {
            Ok(Report::Final(f)) => f,
            _ => panic!("the final line"),
        };
        let bleu = || Some(final_line(r#"{"final": true, "ece": 0.2, "bleu": 31.5}"#));
        let t = finish(vec![e.clone()], bleu(), "bleu").unwrap();
        assert_eq!(t.custom, [("bleu".to_string(), 31.5)].into());
        assert!(finish(vec![e.clone()], None, "ece").is_ok());
        assert!(
            finish(vec![e.clone()], None, "bleu")
                .unwrap_err()
                .contains("no `bleu`, the sweep's score")
        );
        let disagrees = finish(
            vec![e],
            Some(final_line(r#"{"final": true, "ece": 0.3}"#)),
            "ece",
        );
        assert!(disagrees.unwrap_err().contains("the final ece = 0.3"));
    }

    /// An epoch line may carry only its number and the score; only the score is required, at
    /// the last epoch or on the final line.
    #[test]
    fn only_the_score_is_required() {
        let epoch = |line: &str, seen| match parse_line(line, seen) {
            Ok(Report::Epoch(e)) => e,
            _ => panic!("an epoch: {line}"),
        };
        let first = epoch(r#"{"epoch": 1}"#, 0);
        assert_eq!(
            (first.train_loss, first.train_accuracy, first.lr),
            (None, None, None)
        );
        let last = epoch(r#"{"epoch": 2, "test_loss": 2.5}"#, 1);
        let t = finish(vec![first.clone(), last.clone()], None, "test_loss").unwrap();
        assert_eq!(t.history[1].test_loss, Some(2.5));
        assert_eq!(t.history[1].test_accuracy, None);
        assert!(
            finish(vec![first, last], None, "test_accuracy")
                .unwrap_err()
                .contains("no `test_accuracy`, the sweep's score")
        );
    }
}
