//! Task `command`: the researcher's own training program, run once per lease, a stranger. It
//! learns its seeds from its arguments (placeholders) and environment (`SEEDSWEEP_SEED`, ...),
//! an environment the worker builds ([`env`]), and reports by appending JSON lines to the file
//! named in `SEEDSWEEP_METRICS_FILE` ([`protocol`]). Its stdout and stderr go to a bounded log
//! ([`output`]). Every process it starts is contained ([`contain`]): the run ends when its main
//! process exits, and whatever it left running ends with it; shutdown, a lost lease and the time
//! limit reach every process of the run (SIGTERM, then SIGKILL after a grace period).

pub mod contain;
pub mod env;
mod output;
mod protocol;

use crate::run::{EpochMetrics, Precision, TrainError, Trained};
use protocol::{Final, Report, Reports, Unreadable};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a stopped program has between SIGTERM and SIGKILL.
pub const GRACE: Duration = Duration::from_secs(10);
/// How long the output of a run whose main process ended is still read: what is left in the
/// pipes once every process of the run is gone.
const DRAIN: Duration = Duration::from_secs(2);
/// How often the subreaper notes a running program's processes.
const WATCH_EVERY: Duration = Duration::from_millis(500);

/// One run of the program, ready to start.
#[derive(Debug, Clone)]
pub struct CommandRun {
    /// The program (resolved on this host) and its arguments, placeholders replaced.
    pub argv: Vec<String>,
    pub workdir: Option<PathBuf>,
    /// Its whole environment ([`env::EnvPolicy::build`]).
    pub env: Vec<(String, String)>,
    pub time_limit: Option<Duration>,
    /// Where its stdout and stderr go, and beside it (`.metrics.jsonl`) its reports.
    pub log: PathBuf,
    /// Its checkpoint folder (`SEEDSWEEP_CHECKPOINT_DIR`), kept across re-leases of the seed.
    pub checkpoints: Option<PathBuf>,
    /// The sweep's score: the metric every result must carry.
    pub score: String,
    /// What the run may use at most, enforced by its cgroup.
    pub limits: contain::Limits,
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
    device: crate::run::Device,
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
        crate::run::Device::Cuda(n) => n.to_string(),
        _ => String::new(),
    };
    env.push(("CUDA_VISIBLE_DEVICES".into(), visible));
    env
}

/// Kills every running program and all it started (a second signal: the worker exits now).
pub fn kill_all() {
    contain::kill_every_run();
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
    output::create_new(&metrics_path)
        .map_err(|e| host(&format!("cannot create {}", metrics_path.display()), e))?;
    let log = Arc::new(Mutex::new(
        output::Log::open(&job.log).map_err(|e| host("cannot open the run's log", e))?,
    ));
    let mut cmd = std::process::Command::new(&job.argv[0]);
    cmd.args(&job.argv[1..])
        .env_clear()
        .envs(job.env.iter().map(|(k, v)| (k, v)))
        .env("SEEDSWEEP_METRICS_FILE", &metrics_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(dir) = &job.workdir {
        cmd.current_dir(dir);
    }
    let prepared = contain::prepare(&mut cmd, job.limits).map_err(TrainError::Host)?;
    let (mut child, mut contained) = prepared
        .spawn(&mut cmd)
        .map_err(|e| TrainError::Config(format!("cannot start `{}`: {e}", job.argv[0])))?;
    let outcome = supervise(
        job,
        &mut child,
        &mut contained,
        &metrics_path,
        &log,
        stop,
        &mut on_epoch,
    );
    if matches!(child.try_wait(), Ok(None)) {
        terminate(&mut child, &mut contained);
    }
    // Dropping `contained` ends every process of the run, however the run ended.
    outcome
}

/// Watches the running program: reads its reports, enforces the stop and the time limit, and
/// judges how it ended. The run ends when the main process exits, whatever its children hold.
fn supervise(
    job: &CommandRun,
    child: &mut Child,
    contained: &mut contain::Contained,
    metrics_path: &Path,
    log: &Arc<Mutex<output::Log>>,
    stop: &AtomicBool,
    on_epoch: &mut impl FnMut(&EpochMetrics),
) -> Result<Trained, TrainError> {
    let tail = output::Tail::default();
    let drained = Arc::new(AtomicBool::new(false));
    let (done, copied) = std::sync::mpsc::channel();
    let copy = |out, tail| output::copy(out, log.clone(), tail, drained.clone(), done.clone());
    let copiers = [
        child
            .stdout
            .take()
            .map(|o| copy(Box::new(o) as output::Pipe, None)),
        child
            .stderr
            .take()
            .map(|o| copy(Box::new(o) as output::Pipe, Some(tail.clone()))),
    ];
    let mut reports = Reports::new(metrics_path)
        .map_err(|e| TrainError::Host(format!("cannot read {}: {e}", metrics_path.display())))?;
    let mut tally = Tally::new();
    let started = Instant::now();
    let mut watched = started;
    let status = loop {
        if let Err(e) = tally.read(&mut reports, on_epoch) {
            terminate(child, contained);
            return Err(e);
        }
        if tally.diverged.is_some() {
            // Diverged: the rest of the run has nothing to add.
            terminate(child, contained);
            return Ok(tally.into_diverged());
        }
        if let Some(status) = child
            .try_wait()
            .map_err(|e| TrainError::Host(e.to_string()))?
        {
            break status;
        }
        if stop.load(Ordering::Relaxed) {
            terminate(child, contained);
            return Err(TrainError::Cancelled);
        }
        if let Some(limit) = job.time_limit.filter(|l| started.elapsed() > *l) {
            terminate(child, contained);
            return Err(TrainError::Program(format!(
                "the program ran past the sweep's time limit of {} s and was stopped",
                limit.as_secs()
            )));
        }
        if watched.elapsed() >= WATCH_EVERY {
            contained.watch();
            watched = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // What the program left running goes now: it may hold the output pipes open. What is
    // still in the pipes is read for a moment, no longer: a process no mechanism could find
    // must not hold the run.
    contained.kill_all();
    let drain_until = Instant::now() + DRAIN;
    for _ in copiers.iter().flatten() {
        let left = drain_until.saturating_duration_since(Instant::now());
        if copied.recv_timeout(left).is_err() {
            break;
        }
    }
    drained.store(true, Ordering::Relaxed);
    for c in copiers.into_iter().flatten() {
        let _ = c.join();
    }
    tally.read(&mut reports, on_epoch)?;
    judge(status, tally, &job.score, &tail, contained.limit_met())
}

/// The run from how its main process ended and what it reported.
fn judge(
    status: std::process::ExitStatus,
    tally: Tally,
    score: &str,
    tail: &output::Tail,
    limit_met: Option<&str>,
) -> Result<Trained, TrainError> {
    // A divergence it reported is its result, however the program then ended.
    if tally.diverged.is_some() {
        return Ok(tally.into_diverged());
    }
    if !status.success() {
        let how = match (
            status.code(),
            std::os::unix::process::ExitStatusExt::signal(&status),
        ) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(signal)) => format!("was killed by signal {signal}"),
            (None, None) => format!("ended: {status}"),
        };
        let limit = limit_met.map_or(String::new(), |why| format!(": {why}"));
        return Err(TrainError::Program(format!(
            "the program {how}{limit}; {}",
            tail.quoted()
        )));
    }
    protocol::finish(tally.history, tally.last, score)
        .map_err(|e| TrainError::Program(format!("{e}; {}", tail.quoted())))
}

/// What the program has reported so far.
struct Tally {
    history: Vec<EpochMetrics>,
    last: Option<Final>,
    last_epoch_at: Instant,
    /// The epoch the program diverged in, once it said so (nothing after it is read).
    diverged: Option<u32>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            history: Vec::new(),
            last: None,
            last_epoch_at: Instant::now(),
            diverged: None,
        }
    }

    /// The diverged run: its finite epochs, in the protocol's default arithmetic (a program
    /// that diverged sent no final line to say otherwise), not known to repeat.
    fn into_diverged(self) -> Trained {
        let epoch = self.diverged.unwrap_or(self.history.len() as u32 + 1);
        Trained::diverged(epoch, self.history, Precision::Fp32, false)
    }

    /// Reads the lines written since the last call, passing each epoch to `on_epoch`.
    fn read(
        &mut self,
        reports: &mut Reports,
        on_epoch: &mut impl FnMut(&EpochMetrics),
    ) -> Result<(), TrainError> {
        let lines = reports.new_lines().map_err(|e| match e {
            Unreadable::Host(e) => TrainError::Host(format!("cannot read the reports: {e}")),
            Unreadable::Line(why) => TrainError::Program(why),
        })?;
        for line in lines {
            if self.diverged.is_some() {
                break;
            }
            match protocol::parse_line(&line, self.history.len() as u32)
                .map_err(TrainError::Program)?
            {
                Report::Epoch(mut m) => {
                    if m.seconds.is_nan() {
                        m.seconds = self.last_epoch_at.elapsed().as_secs_f64();
                    }
                    self.last_epoch_at = Instant::now();
                    on_epoch(&m);
                    self.history.push(m);
                }
                Report::Final(f) => self.last = Some(f),
                Report::Diverged { epoch } => self.diverged = Some(epoch),
            }
        }
        Ok(())
    }
}

/// SIGTERM to every process of the run, then SIGKILL after [`GRACE`] if the main one is still
/// there.
fn terminate(child: &mut Child, contained: &mut contain::Contained) {
    contained.signal_all(libc::SIGTERM);
    let deadline = Instant::now() + GRACE;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    contained.kill_all();
    let _ = child.wait();
}
