//! Task `command`: the researcher's own training program, run once per lease in its own process
//! group. It learns its seeds from its arguments (placeholders) and environment
//! (`SEEDSWEEP_SEED`, ...) and reports by appending one JSON object per line to the file named in
//! `SEEDSWEEP_METRICS_FILE` (README, "Your own training program"): an epoch's metrics
//! (`{"epoch": 3, "train_loss": 0.4, ...}`), then optionally its final result
//! (`{"final": true, ..., "examples": N, "correct": BASE64}`). Its stdout and stderr go to a log
//! file, bounded. The worker stops the group on shutdown, a lost lease or the time limit
//! (SIGTERM, then SIGKILL after a grace period) and kills what is left of it when the program
//! exits.

use crate::train::{Correct, EpochMetrics, TrainError, Trained};
use base64::Engine;
use seedsweep_core::metric::CustomMetrics;
use seedsweep_core::spec::Precision;
use serde_json::{Map, Value};
use std::collections::VecDeque;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a stopped program has between SIGTERM and SIGKILL.
pub const GRACE: Duration = Duration::from_secs(10);
/// A run's log file is cut at this size: the older half goes to `NAME.1` (one generation kept).
const LOG_BYTES: u64 = 32 << 20;
/// Lines of stderr quoted in a failed attempt's cause.
const STDERR_TAIL: usize = 20;
/// The longest metrics line read; a longer one fails the run.
const MAX_LINE: usize = 4 << 20;
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

/// One run of the program, ready to start.
#[derive(Debug, Clone)]
pub struct CommandRun {
    /// The program (resolved on this host) and its arguments, placeholders replaced.
    pub argv: Vec<String>,
    pub workdir: Option<PathBuf>,
    /// The sweep's variables, then the worker's own (`SEEDSWEEP_*`, `CUDA_VISIBLE_DEVICES`).
    pub env: Vec<(String, String)>,
    pub time_limit: Option<Duration>,
    /// Where its stdout and stderr go, and beside it (`.metrics.jsonl`) its reports.
    pub log: PathBuf,
    /// Its checkpoint folder (`SEEDSWEEP_CHECKPOINT_DIR`), kept across re-leases of the seed.
    pub checkpoints: Option<PathBuf>,
    /// The sweep's score: the metric every result must carry.
    pub score: String,
}

impl CommandRun {
    pub fn metrics_file(&self) -> PathBuf {
        self.log.with_extension("metrics.jsonl")
    }
}

/// `program` (a sweep's `argv[0]`) as this host resolves it: a bare name through `PATH`, a
/// relative path from `workdir`, symbolic links followed; allowed only when it is one of
/// `allowed` (the worker's `--allow-command`, resolved the same way at start).
pub fn allowed(
    program: &str,
    workdir: Option<&Path>,
    allowed: &[PathBuf],
) -> Result<PathBuf, String> {
    let refuse = |why: String| {
        format!(
            "{why}; a worker runs only the programs it was started with --allow-command PROGRAM"
        )
    };
    if allowed.is_empty() {
        return Err(refuse(format!(
            "this worker runs no program: the sweep asks for `{program}`"
        )));
    }
    let resolved = resolve(program, workdir).ok_or_else(|| {
        refuse(format!(
            "`{program}` is not an executable file on this host"
        ))
    })?;
    if !allowed.contains(&resolved) {
        return Err(refuse(format!(
            "`{program}` ({}) is not allowed here (allowed: {})",
            resolved.display(),
            allowed
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(resolved)
}

/// A program name resolved to the executable file it runs: `PATH` for a bare name (as a shell
/// would), else the path (from `workdir` when relative); canonical (links followed).
pub fn resolve(program: &str, workdir: Option<&Path>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let found = if program.contains('/') {
        let p = Path::new(program);
        let p = match workdir {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.to_path_buf(),
        };
        executable(&p).then_some(p)
    } else {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|p| executable(p))
    };
    found.and_then(|p| p.canonicalize().ok())
}

/// The variables that tell the program its run: its seeds, sweep and fence, its checkpoint
/// folder (kept across re-leases of the seed), and its device.
pub fn seed_env(
    lease: &seedsweep_proto::v1::Lease,
    factors: &seedsweep_proto::v1::FactorSeeds,
    checkpoints: Option<&Path>,
    device: tch::Device,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("SEEDSWEEP_SEED", lease.seed.to_string()),
        ("SEEDSWEEP_INIT_SEED", factors.init.to_string()),
        ("SEEDSWEEP_ORDER_SEED", factors.order.to_string()),
        ("SEEDSWEEP_AUGMENT_SEED", factors.augment.to_string()),
        ("SEEDSWEEP_SPLIT_SEED", factors.split.to_string()),
        ("SEEDSWEEP_SWEEP_ID", lease.sweep_id.clone()),
        ("SEEDSWEEP_FENCE", lease.fence.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if let Some(dir) = checkpoints {
        env.push(("SEEDSWEEP_CHECKPOINT_DIR".into(), dir.display().to_string()));
    }
    // A CPU worker's program sees no GPU; a GPU worker's sees its device (every slot shares it).
    let visible = match device {
        tch::Device::Cuda(n) => n.to_string(),
        _ => String::new(),
    };
    env.push(("CUDA_VISIBLE_DEVICES".into(), visible));
    env
}

/// The process groups of the programs running now, for a worker that must exit at once.
static RUNNING: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Kills every running program's group (a second signal: the worker exits now).
pub fn kill_all() {
    for pgid in RUNNING.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        signal_group(*pgid, libc::SIGKILL);
    }
}

fn signal_group(pgid: i32, signal: i32) {
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    unsafe {
        libc::kill(-pgid, signal);
    }
}

/// Runs the program to its end, reporting each epoch as it is read. Stopped (`stop`: shutdown
/// or a lost lease) it ends with [`TrainError::Cancelled`]; a failure is the seed's, with its
/// cause: the exit status, the last lines of stderr, or the line of the report that is wrong.
pub fn run(
    job: &CommandRun,
    stop: &AtomicBool,
    mut on_epoch: impl FnMut(&EpochMetrics),
) -> Result<Trained, TrainError> {
    let host = |what: &str, e: std::io::Error| TrainError::Host(format!("{what}: {e}"));
    for dir in [job.log.parent(), job.checkpoints.as_deref()]
        .into_iter()
        .flatten()
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| host(&format!("cannot create {}", dir.display()), e))?;
    }
    let metrics_path = job.metrics_file();
    std::fs::File::create(&metrics_path)
        .map_err(|e| host(&format!("cannot create {}", metrics_path.display()), e))?;
    let log = Arc::new(Mutex::new(
        Log::open(&job.log).map_err(|e| host("cannot open the run's log", e))?,
    ));
    let mut cmd = std::process::Command::new(&job.argv[0]);
    cmd.args(&job.argv[1..])
        .envs(job.env.iter().map(|(k, v)| (k, v)))
        .env("SEEDSWEEP_METRICS_FILE", &metrics_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    if let Some(dir) = &job.workdir {
        cmd.current_dir(dir);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| TrainError::Config(format!("cannot start `{}`: {e}", job.argv[0])))?;
    let pgid = child.id() as i32;
    RUNNING.lock().unwrap_or_else(|p| p.into_inner()).push(pgid);
    let outcome = supervise(job, &mut child, &metrics_path, &log, stop, &mut on_epoch);
    // Whatever the program left behind in its group goes with it, however the run ended.
    signal_group(pgid, libc::SIGKILL);
    RUNNING
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|p| *p != pgid);
    outcome
}

/// Watches the running program: reads its reports, enforces the stop and the time limit, and
/// judges how it ended.
fn supervise(
    job: &CommandRun,
    child: &mut Child,
    metrics_path: &Path,
    log: &Arc<Mutex<Log>>,
    stop: &AtomicBool,
    on_epoch: &mut impl FnMut(&EpochMetrics),
) -> Result<Trained, TrainError> {
    let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
    let copiers = [
        copy_output(
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn Read + Send>),
            log.clone(),
            None,
        ),
        copy_output(
            child
                .stderr
                .take()
                .map(|o| Box::new(o) as Box<dyn Read + Send>),
            log.clone(),
            Some(stderr_tail.clone()),
        ),
    ];
    let mut reports = Reports::new(metrics_path)
        .map_err(|e| TrainError::Host(format!("cannot read {}: {e}", metrics_path.display())))?;
    let started = Instant::now();
    let mut last_epoch_at = started;
    let mut history: Vec<EpochMetrics> = Vec::new();
    let mut last: Option<Final> = None;
    let mut read =
        |history: &mut Vec<EpochMetrics>, last: &mut Option<Final>| -> Result<(), TrainError> {
            for line in reports
                .new_lines()
                .map_err(|e| TrainError::Host(format!("cannot read the reports: {e}")))?
            {
                match parse_line(&line, history.len() as u32).map_err(TrainError::Program)? {
                    Report::Epoch(mut m) => {
                        if m.seconds.is_nan() {
                            m.seconds = last_epoch_at.elapsed().as_secs_f64();
                        }
                        last_epoch_at = Instant::now();
                        on_epoch(&m);
                        history.push(m);
                    }
                    Report::Final(f) => *last = Some(f),
                }
            }
            Ok(())
        };
    let status = loop {
        if let Err(e) = read(&mut history, &mut last) {
            terminate(child);
            return Err(e);
        }
        if let Some(status) = child
            .try_wait()
            .map_err(|e| TrainError::Host(e.to_string()))?
        {
            break status;
        }
        if stop.load(Ordering::Relaxed) {
            terminate(child);
            return Err(TrainError::Cancelled);
        }
        if job
            .time_limit
            .is_some_and(|limit| started.elapsed() > limit)
        {
            terminate(child);
            return Err(TrainError::Program(format!(
                "the program ran past the sweep's time limit of {} s and was stopped",
                job.time_limit.unwrap_or_default().as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // What the program left running in its group goes now: it may hold the output pipes open,
    // and the copiers end only when every holder is gone.
    signal_group(child.id() as i32, libc::SIGKILL);
    for c in copiers.into_iter().flatten() {
        let _ = c.join();
    }
    read(&mut history, &mut last)?;
    let tail = || {
        let lines = stderr_tail.lock().unwrap_or_else(|p| p.into_inner());
        if lines.is_empty() {
            String::from("(nothing on stderr)")
        } else {
            format!(
                "last lines of stderr:\n{}",
                lines.iter().cloned().collect::<Vec<_>>().join("\n")
            )
        }
    };
    if !status.success() {
        let how = match (
            status.code(),
            std::os::unix::process::ExitStatusExt::signal(&status),
        ) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(signal)) => format!("was killed by signal {signal}"),
            (None, None) => format!("ended: {status}"),
        };
        return Err(TrainError::Program(format!(
            "the program {how}; {}",
            tail()
        )));
    }
    finish(history, last, &job.score).map_err(|e| TrainError::Program(format!("{e}; {}", tail())))
}

/// The trained run from its reports: its epochs, and the final line's bitmap and settings. It
/// must carry the sweep's `score`.
fn finish(history: Vec<EpochMetrics>, last: Option<Final>, score: &str) -> Result<Trained, String> {
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
    if final_epoch.test_accuracy.is_none() || final_epoch.test_loss.is_none() {
        return Err(format!(
            "the last epoch ({}) reports no test_accuracy or test_loss: a result needs both",
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
    })
}

fn epoch_metric(m: &EpochMetrics, name: &str) -> Option<f64> {
    match name {
        "train_loss" => Some(m.train_loss),
        "train_accuracy" => Some(m.train_accuracy),
        "test_loss" => m.test_loss,
        "test_accuracy" => m.test_accuracy,
        "test_top5" => m.test_top5,
        "val_loss" => m.val_loss,
        "val_accuracy" => m.val_accuracy,
        "lr" => Some(m.lr),
        _ => None,
    }
}

/// SIGTERM to the group, then SIGKILL after [`GRACE`] if the program is still there.
fn terminate(child: &mut Child) {
    let pgid = child.id() as i32;
    signal_group(pgid, libc::SIGTERM);
    let deadline = Instant::now() + GRACE;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    signal_group(pgid, libc::SIGKILL);
    let _ = child.wait();
}

/// One line of the report file, understood.
enum Report {
    Epoch(EpochMetrics),
    Final(Final),
}

/// The final line: its metrics (which must be the last epoch's, but for custom metrics the last
/// epoch did not report) and what only it carries.
struct Final {
    metrics: Vec<(String, f64)>,
    custom: CustomMetrics,
    correct: Option<Correct>,
    precision: Precision,
    deterministic: bool,
}

/// Parses one report line; `seen` epochs came before it. The error quotes the line.
fn parse_line(line: &str, seen: u32) -> Result<Report, String> {
    let quoted = if line.len() > 200 {
        format!("{}...", &line[..line.floor_char_boundary(200)])
    } else {
        line.to_string()
    };
    let bad = |why: String| format!("bad metrics line {}: {why}: {quoted}", seen + 1);
    let Ok(Value::Object(mut obj)) = serde_json::from_str::<Value>(line) else {
        return Err(bad("not a JSON object".into()));
    };
    if obj.remove("final").is_some() {
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
    let (numbers, custom) = numbers(obj).map_err(bad)?;
    let get = |name: &str| numbers.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
    let need = |name: &str| {
        get(name).ok_or_else(|| {
            bad(format!(
                "`{name}` is missing: each epoch reports train_loss, train_accuracy and lr"
            ))
        })
    };
    Ok(Report::Epoch(EpochMetrics {
        epoch: epoch as u32,
        train_loss: need("train_loss")?,
        train_accuracy: need("train_accuracy")?,
        test_loss: get("test_loss"),
        test_accuracy: get("test_accuracy"),
        test_top5: get("test_top5"),
        val_loss: get("val_loss"),
        val_accuracy: get("val_accuracy"),
        lr: need("lr")?,
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

/// The line's remaining keys, finite numbers all: the known metrics, and the custom ones.
fn numbers(obj: Map<String, Value>) -> Result<(Vec<(String, f64)>, CustomMetrics), String> {
    let (mut known, mut custom) = (Vec::new(), CustomMetrics::new());
    for (name, v) in obj {
        let Some(x) = v.as_f64().filter(|x| x.is_finite()) else {
            return Err(format!("`{name}` = {v}: a metric is a finite number"));
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

/// The report file, read as it grows: complete lines only.
struct Reports {
    file: std::io::BufReader<std::fs::File>,
    partial: String,
}

impl Reports {
    fn new(path: &Path) -> std::io::Result<Reports> {
        Ok(Reports {
            file: std::io::BufReader::new(std::fs::File::open(path)?),
            partial: String::new(),
        })
    }

    fn new_lines(&mut self) -> std::io::Result<Vec<String>> {
        let mut lines = Vec::new();
        loop {
            let mut chunk = String::new();
            if self.file.read_line(&mut chunk)? == 0 {
                return Ok(lines);
            }
            self.partial.push_str(&chunk);
            if self.partial.len() > MAX_LINE {
                return Err(std::io::Error::other(format!(
                    "a metrics line is longer than {MAX_LINE} bytes"
                )));
            }
            if self.partial.ends_with('\n') {
                let line = std::mem::take(&mut self.partial);
                if !line.trim().is_empty() {
                    lines.push(line.trim_end().to_string());
                }
            }
        }
    }
}

/// A run's log file, cut at [`LOG_BYTES`]: the full file becomes `NAME.1` and writing goes on
/// in a new one.
struct Log {
    path: PathBuf,
    file: std::fs::File,
    written: u64,
}

impl Log {
    fn open(path: &Path) -> std::io::Result<Log> {
        Ok(Log {
            path: path.to_path_buf(),
            file: std::fs::File::create(path)?,
            written: 0,
        })
    }

    fn write(&mut self, bytes: &[u8]) {
        if self.written + bytes.len() as u64 > LOG_BYTES {
            let mut older = self.path.clone().into_os_string();
            older.push(".1");
            let reopened = std::fs::rename(&self.path, &older)
                .and_then(|()| std::fs::File::create(&self.path));
            match reopened {
                Ok(f) => {
                    self.file = f;
                    self.written = 0;
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot rotate a run's log")
                }
            }
        }
        if self.file.write_all(bytes).is_ok() {
            self.written += bytes.len() as u64;
        }
    }
}

/// Copies one of the program's outputs into the log, line by line, keeping the last lines in
/// `tail` when given.
fn copy_output(
    out: Option<Box<dyn Read + Send>>,
    log: Arc<Mutex<Log>>,
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
) -> Option<std::thread::JoinHandle<()>> {
    let out = out?;
    Some(std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(out);
        let mut line = Vec::new();
        while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
            log.lock().unwrap_or_else(|p| p.into_inner()).write(&line);
            if let Some(tail) = &tail {
                let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
                let text = String::from_utf8_lossy(&line);
                tail.push_back(text.trim_end().chars().take(500).collect());
                if tail.len() > STDERR_TAIL {
                    tail.pop_front();
                }
            }
            line.clear();
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

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
            err(r#"{"epoch": 1, "train_accuracy": 0, "lr": 1}"#, 0)
                .contains("`train_loss` is missing")
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
}
