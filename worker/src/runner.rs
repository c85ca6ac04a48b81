//! The worker loop: lease a seed, train it while heartbeating, stream each epoch's metrics, report
//! the result, repeat. The worker never touches the database; it speaks only gRPC.

use crate::command;
use crate::lease::{HandBacks, Held, is_lost, is_transient, sleep_unless};
use crate::metrics::WorkerMetrics;
pub use crate::run::Device;
use crate::run::{Blame, EpochMetrics, Seeds, TrainError, Trained};
use crate::spool::Spool;
use crate::stream::{epoch_pb, ship_metrics};
use anyhow::{Context, bail};
use seedsweep_core::policy::Charge;
use seedsweep_core::spec::Task;
use seedsweep_proto::client::{Client, Connection};
use seedsweep_proto::v1 as pb;
use sha2::Digest;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::Status;

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub coordinator: Connection,
    pub device: Device,
    /// What the built-in training tasks need: their data, backbones and caches.
    #[cfg(feature = "torch")]
    pub builtin: crate::builtin::Settings,
    pub worker_id: String,
    /// Exit once no seed is pending or leased anywhere, instead of waiting for new sweeps.
    pub exit_when_idle: bool,
    /// How long to keep trying to reach the coordinator at start.
    pub connect_timeout: Duration,
    /// How long to wait before asking again when there is nothing to lease.
    pub idle_poll: Duration,
    /// Exit after this many leases (finished, failed or lost), if set.
    pub max_seeds: Option<u64>,
    /// How long to keep retrying a report while the coordinator is unreachable.
    pub lease_patience: Duration,
    /// Seeds trained at once on the device, each with its own lease.
    pub slots: usize,
    /// Where runs save checkpoints (sweeps with `checkpoint_every`), shared by the workers that
    /// should be able to resume each other's seeds.
    pub checkpoint_dir: Option<PathBuf>,
    /// Where finished results wait until the coordinator has them (local disk).
    pub spool_dir: PathBuf,
    /// The programs sweeps of task `command` may run here (resolved paths); none: no command.
    pub allowed_commands: Vec<PathBuf>,
    /// The same as the coordinator is told of them: each as given, then as resolved.
    pub allowed_programs: Vec<String>,
    /// Where each command run's output goes.
    pub log_dir: PathBuf,
    /// What of its environment a program gets, and which guarded variables a sweep may set.
    pub env_policy: command::env::EnvPolicy,
}

/// The tasks this worker can run, which it tells the coordinator with each lease request: the
/// built-in ones where it was built with them (feature `torch`), and `command` where
/// `--allow-command` allows a program.
pub fn runnable(settings: &WorkerSettings) -> Vec<Task> {
    let builtin = if cfg!(feature = "torch") {
        &[Task::Resnet9, Task::FinetuneHead][..]
    } else {
        &[]
    };
    let command = (!settings.allowed_commands.is_empty()).then_some(Task::Command);
    builtin.iter().copied().chain(command).collect()
}

/// Checks the lease's names that become paths on this host (its sweep id, dataset and backbone
/// file) as the coordinator checked the sweep file: a lease is trusted no more than a file.
fn check_lease_names(lease: &pb::Lease) -> Result<(), String> {
    let canonical = lease
        .sweep_id
        .parse::<seedsweep_core::domain::SweepId>()
        .is_ok_and(|id| id.to_string() == lease.sweep_id);
    if !canonical {
        return Err(format!(
            "the lease's sweep id `{}` is not a sweep id (a UUID)",
            lease.sweep_id.escape_default()
        ));
    }
    if !lease.dataset.is_empty() {
        seedsweep_core::spec::check_dataset_name(&lease.dataset)
            .map_err(|e| format!("the lease's {e}"))?;
    }
    let backbone = lease.finetune.as_ref().and_then(|f| f.backbone.as_ref());
    if let Some(b) = backbone {
        seedsweep_core::spec::finetune::check_backbone_file(&b.file)
            .map_err(|e| format!("the lease's {e}"))?;
    }
    Ok(())
}

/// The longest wait between two tries to deliver a result while the coordinator is away: short
/// beside any lease TTL, so a result lands within the grace the coordinator gives once back.
const DELIVERY_BACKOFF: Duration = Duration::from_secs(2);

pub struct Worker {
    settings: WorkerSettings,
    client: Client,
    /// The built-in tasks' datasets and backbone features, shared by the slots.
    #[cfg(feature = "torch")]
    builtin: crate::builtin::Builtin,
    /// Set by SIGINT/SIGTERM: stop training, hand the seeds back, exit.
    shutdown: Arc<AtomicBool>,
    /// Leases taken so far (for `--max-seeds`).
    leases: AtomicU64,
    metrics: Arc<WorkerMetrics>,
    /// Hands back the seeds of leases dropped unsettled (see [`Held`]).
    handbacks: HandBacks,
    /// Finished results not yet recorded by the coordinator.
    spool: Spool,
}

/// One lease's training, prepared.
enum Job {
    /// A built-in training task's (feature `torch`).
    #[cfg(feature = "torch")]
    Builtin(crate::builtin::Job),
    Command {
        run: command::CommandRun,
        /// Exactly this many epochs, when the sweep says.
        epochs: Option<u32>,
    },
}

impl Job {
    fn fingerprint(&self) -> String {
        match self {
            #[cfg(feature = "torch")]
            Job::Builtin(job) => job.fingerprint(),
            // The program brings its own data: the run is known by what ran.
            Job::Command { run, .. } => format!(
                "command:{:x}",
                sha2::Sha256::digest(format!("{:?}|{:?}", run.argv, run.workdir))
            ),
        }
    }

    /// Where the run's output goes (a program's log).
    fn log(&self) -> Option<&std::path::Path> {
        match self {
            #[cfg(feature = "torch")]
            Job::Builtin(_) => None,
            Job::Command { run, .. } => Some(&run.log),
        }
    }

    fn checkpoint_dir(&self) -> Option<PathBuf> {
        match self {
            #[cfg(feature = "torch")]
            Job::Builtin(job) => job.checkpoint_dir(),
            Job::Command { run, .. } => run.checkpoints.clone(),
        }
    }

    /// How many metrics reports the run makes (epochs, or evaluations).
    fn epochs(&self) -> u32 {
        match self {
            #[cfg(feature = "torch")]
            Job::Builtin(job) => job.epochs(),
            // Not known in advance: the next lease is asked for once this one ends.
            Job::Command { epochs, .. } => epochs.unwrap_or(u32::MAX),
        }
    }

    /// Whether the run repeats bit for bit on `device` (a program's is not known: not).
    fn deterministic(&self, device: crate::run::Device) -> bool {
        match self {
            #[cfg(feature = "torch")]
            Job::Builtin(job) => job.deterministic(device),
            Job::Command { .. } => {
                let _ = device;
                false
            }
        }
    }

    /// The training images an epoch goes through, for the throughput metric.
    fn images_per_epoch(&self) -> Option<u64> {
        match self {
            #[cfg(feature = "torch")]
            Job::Builtin(job) => job.images_per_epoch(),
            Job::Command { .. } => None,
        }
    }

    #[cfg_attr(not(feature = "torch"), allow(unused_variables))]
    fn run(
        self,
        seeds: Seeds,
        device: Device,
        stop: &AtomicBool,
        worker: &RunContext,
        on_epoch: impl FnMut(&EpochMetrics),
    ) -> Result<Trained, TrainError> {
        match self {
            #[cfg(feature = "torch")]
            Job::Builtin(job) => job.run(seeds, device, stop, &worker.features, on_epoch),
            Job::Command { run, .. } => command::run(&run, stop, on_epoch),
        }
    }
}

/// What of the worker a run takes onto its training thread: the built-in tasks' feature
/// settings (nothing without them).
#[derive(Clone)]
struct RunContext {
    #[cfg(feature = "torch")]
    features: crate::builtin::FeatureSettings,
}

/// Why a lease cannot be trained here.
pub(crate) enum Unprepared {
    /// This worker does not know what the lease asks for: handed back uncounted, and the worker
    /// stops (it needs an upgrade).
    Upgrade(String),
    /// Charged as its [`Blame`] says: the lease lacks what its task needs (the configuration's),
    /// or this host misses its data (the host's).
    Blamed(Blame, String),
    /// Shutdown was asked for while the data was loading or downloading: handed back uncounted.
    #[cfg_attr(
        not(feature = "torch"),
        expect(dead_code, reason = "only the built-in tasks load data")
    )]
    Stopped,
}

/// One lease's training, as it came back.
struct Ran {
    trained: Result<Trained, TrainError>,
    /// The metrics stream's verdict.
    streamed: Result<(), Status>,
    started: Instant,
    seconds: f64,
}

/// What the report needs to know of a run besides its training.
struct RunInfo {
    fingerprint: String,
    checkpoint_dir: Option<PathBuf>,
    /// Whether the run repeats bit for bit (a failure's cause would then recur anywhere).
    deterministic: bool,
    /// When the slot was free to train this seed.
    slot_free: Instant,
}

/// The generator seeds of a lease's run, from its factor seeds (the seed itself for a lease from
/// a coordinator that sends none).
fn run_seeds(lease: &pb::Lease) -> Seeds {
    let factors = lease_factors(lease);
    Seeds::derive(
        &lease.seed_namespace,
        factors.init,
        factors.order,
        factors.augment,
        factors.split,
    )
}

/// A lease's factor seeds: the seed itself for each, from a coordinator that sends none.
fn lease_factors(lease: &pb::Lease) -> pb::FactorSeeds {
    lease.factors.unwrap_or(pb::FactorSeeds {
        init: lease.seed,
        order: lease.seed,
        augment: lease.seed,
        split: lease.seed,
    })
}

/// How one lease ended, from the worker's side.
#[derive(Debug, PartialEq)]
enum LeaseEnd {
    Finished,
    /// The coordinator no longer considers this worker the holder; drop the seed and move on.
    Lost,
    /// Shutdown was requested; the seed was handed back (or its result left in the spool).
    ShutDown,
}

/// How the delivery of a spooled result ended.
enum Delivery {
    Recorded,
    /// The coordinator no longer counts the lease (the seed was re-leased, cancelled, ...).
    Refused(Status),
    /// Shutdown was requested while the coordinator was unreachable; the result stays spooled.
    Stopped,
}

/// What asking for a lease gave.
enum Asked {
    Lease(Box<Held>),
    NoWork {
        outstanding: u64,
    },
    /// `--max-seeds` leases were taken already.
    Enough,
}

impl Worker {
    /// Connects to the coordinator, retrying until `--connect-timeout`; None when shutdown
    /// was asked for first.
    pub async fn connect(
        settings: WorkerSettings,
        shutdown: Arc<AtomicBool>,
        metrics: Arc<WorkerMetrics>,
    ) -> anyhow::Result<Option<Worker>> {
        let url = &settings.coordinator.url;
        let endpoint = settings.coordinator.endpoint()?;
        let deadline = Instant::now() + settings.connect_timeout;
        let channel = loop {
            match endpoint.connect().await {
                Ok(c) => break c,
                Err(e) if Instant::now() >= deadline => {
                    bail!(
                        "cannot reach the coordinator at {url} ({e}) after {:?}: is `coordinator serve` running there? (set --coordinator or SEEDSWEEP_COORDINATOR)",
                        settings.connect_timeout
                    )
                }
                Err(_) if shutdown.load(Ordering::Relaxed) => return Ok(None),
                Err(_) => sleep_unless(&shutdown, Duration::from_millis(500)).await,
            }
        };
        tracing::info!(coordinator = %url, worker = %settings.worker_id, device = %settings.device.label(), slots = settings.slots, "worker connected");
        let client = settings.coordinator.client(channel)?;
        let spool = Spool::open(&settings.spool_dir)?;
        let handbacks = HandBacks::new(
            client.clone(),
            settings.worker_id.clone(),
            settings.lease_patience,
            shutdown.clone(),
        );
        #[cfg(feature = "torch")]
        let builtin = crate::builtin::Builtin::new(
            &settings.builtin,
            settings.checkpoint_dir.clone(),
            shutdown.clone(),
        );
        Ok(Some(Worker {
            client,
            handbacks,
            settings,
            metrics,
            #[cfg(feature = "torch")]
            builtin,
            shutdown,
            leases: AtomicU64::new(0),
            spool,
        }))
    }

    /// Runs `--slots` lease loops until there is no more work (with `--exit-when-idle`), the
    /// seeds asked for are done, or shutdown. A fatal error in one slot stops the others (their
    /// seeds are handed back) and is returned.
    pub async fn run(self) -> anyhow::Result<()> {
        let me = Arc::new(self);
        // A result trained before a crash or a long outage goes first: it may still be current.
        me.deliver_spooled().await?;
        let mut slots = tokio::task::JoinSet::new();
        for slot in 0..me.settings.slots.max(1) {
            let w = me.clone();
            slots.spawn(async move { w.slot(slot).await });
        }
        let mut first_error = None;
        while let Some(done) = slots.join_next().await {
            let outcome = done.context("a slot panicked").and_then(|r| r);
            if let Err(e) = outcome
                && first_error.is_none()
            {
                me.shutdown.store(true, Ordering::Relaxed);
                first_error = Some(e);
            }
        }
        // Seeds let go of on an error path (a prefetched lease among them) go back before exit.
        me.handbacks.finish().await;
        first_error.map_or(Ok(()), Err)
    }

    /// One slot: lease, train, report, repeat; the next lease is fetched as the last epoch starts.
    async fn slot(self: Arc<Self>, slot: usize) -> anyhow::Result<()> {
        let mut next: Option<Held> = None;
        let mut delay = Duration::from_millis(500);
        loop {
            if self.shutdown.load(Ordering::Relaxed) {
                if let Some(held) = next.take() {
                    self.hand_back(&held, "prefetched").await;
                }
                return Ok(());
            }
            let held = match next.take() {
                Some(h) => h,
                None => match self.ask().await {
                    Ok(Asked::Lease(h)) => *h,
                    Ok(Asked::Enough) => {
                        tracing::info!(slot, "done the seeds asked for (--max-seeds)");
                        return Ok(());
                    }
                    Ok(Asked::NoWork { outstanding }) => {
                        if self.settings.exit_when_idle && outstanding == 0 {
                            tracing::info!(
                                slot,
                                "no seed left to lease; exiting (--exit-when-idle)"
                            );
                            return Ok(());
                        }
                        tracing::debug!(outstanding, "nothing to lease yet");
                        sleep_unless(&self.shutdown, self.settings.idle_poll).await;
                        continue;
                    }
                    Err(s) if is_transient(&s) => {
                        // The coordinator is down or restarting: wait for it, as long as it takes.
                        tracing::warn!(error = s.message(), "coordinator unreachable; retrying");
                        sleep_unless(&self.shutdown, delay).await;
                        delay = (delay * 2).min(Duration::from_secs(30));
                        continue;
                    }
                    Err(s) => bail!("the coordinator refused a lease: {}", s.message()),
                },
            };
            delay = Duration::from_millis(500);
            let (end, prefetched) = self.run_lease(held).await?;
            next = prefetched;
            if end == LeaseEnd::ShutDown {
                if let Some(held) = next.take() {
                    self.hand_back(&held, "prefetched").await;
                }
                return Ok(());
            }
        }
    }

    /// Asks the coordinator for a lease once; a granted lease is heartbeated from now on.
    async fn ask(&self) -> Result<Asked, Status> {
        if let Some(max) = self.settings.max_seeds
            && self.leases.fetch_add(1, Ordering::SeqCst) >= max
        {
            self.leases.fetch_sub(1, Ordering::SeqCst);
            return Ok(Asked::Enough);
        }
        let request = pb::LeaseSeedRequest {
            worker_id: self.settings.worker_id.clone(),
            allowed_commands: self.settings.allowed_programs.clone(),
            allowed_env: self.settings.env_policy.allow.clone(),
            tasks: runnable(&self.settings)
                .iter()
                .map(|t| t.as_str().to_string())
                .collect(),
        };
        let reply = self.client.clone().lease_seed(request).await;
        let outcome = reply.map(|r| r.into_inner().outcome);
        let give_ticket_back = || {
            if self.settings.max_seeds.is_some() {
                self.leases.fetch_sub(1, Ordering::SeqCst);
            }
        };
        match outcome {
            Ok(Some(pb::lease_seed_response::Outcome::Lease(lease))) => {
                Ok(Asked::Lease(Box::new(self.hold(lease))))
            }
            Ok(Some(pb::lease_seed_response::Outcome::NoWork(w))) => {
                give_ticket_back();
                Ok(Asked::NoWork {
                    outstanding: w.outstanding,
                })
            }
            Ok(None) => {
                give_ticket_back();
                Err(Status::internal(
                    "the coordinator sent an empty lease reply",
                ))
            }
            Err(s) => {
                give_ticket_back();
                Err(s)
            }
        }
    }

    fn hold(&self, lease: pb::Lease) -> Held {
        tracing::info!(sweep = %lease.sweep_id, seed = lease.seed, fence = lease.fence, "leased");
        let every = Duration::from_secs_f64((lease.lease_ttl_seconds as f64 / 3.0).max(1.0));
        self.handbacks.hold(lease, every)
    }

    /// Hands a seed back on shutdown, not counted as an attempt. A coordinator that does not
    /// answer within [`crate::lease::STOPPING_PATIENCE`] is no error: the worker is stopping either way, and
    /// the seed's lease expires.
    async fn hand_back(&self, held: &Held, which: &str) {
        let seed = held.lref.seed;
        match self.fail(held, "worker shut down", Charge::Uncounted).await {
            Ok(state) => tracing::info!(seed, which, state, "handed the seed back; shutting down"),
            Err(e) => {
                // Not again from the guard: the hand-back had its time.
                held.settle();
                tracing::warn!(seed, which, error = %e, "could not hand the seed back; its lease will expire");
            }
        }
    }

    /// Trains a held lease and reports how it ended, in three phases: prepare (the settings and
    /// the data), train (streaming each epoch; the next lease is fetched as the last epoch
    /// starts), report. Returns the next lease too if one was fetched.
    async fn run_lease(self: &Arc<Self>, held: Held) -> anyhow::Result<(LeaseEnd, Option<Held>)> {
        let slot_free = Instant::now();
        let seeds = run_seeds(&held.lease);
        let job = match self.prepare(&held.lease, &seeds).await {
            Ok(job) => job,
            Err(Unprepared::Upgrade(cause)) => {
                self.fail(&held, &cause, Charge::Uncounted).await?;
                bail!("{cause}; upgrade the worker");
            }
            Err(Unprepared::Blamed(blame, problem)) => {
                return Ok((self.charge(&held, blame, &problem, false).await?, None));
            }
            Err(Unprepared::Stopped) => {
                self.hand_back(&held, "current").await;
                return Ok((LeaseEnd::ShutDown, None));
            }
        };
        if let Some(log) = job.log() {
            let _ = held.log.set(log.display().to_string());
        }
        let run = RunInfo {
            fingerprint: job.fingerprint(),
            checkpoint_dir: job.checkpoint_dir(),
            deterministic: job.deterministic(self.settings.device),
            slot_free,
        };
        let mut shown = Shown::new(&self.metrics, &held.lref);
        let (ran, next) = self.train(&held, job, seeds).await?;
        let end = self.report(&held, ran, run, &mut shown).await?;
        Ok((end, next))
    }

    /// What to train for `lease`: its task's settings, converted, and the data they need.
    async fn prepare(&self, lease: &pb::Lease, seeds: &Seeds) -> Result<Job, Unprepared> {
        check_lease_names(lease).map_err(|e| Unprepared::Blamed(Blame::Configuration, e))?;
        let task = Task::parse(&lease.task).ok_or_else(|| {
            Unprepared::Upgrade(format!(
                "this worker cannot run task `{}` (it runs {})",
                lease.task,
                Task::known()
            ))
        })?;
        match task {
            #[cfg(feature = "torch")]
            Task::Resnet9 | Task::FinetuneHead => {
                (self.builtin.prepare(task, lease, seeds).await).map(Job::Builtin)
            }
            #[cfg(not(feature = "torch"))]
            Task::Resnet9 | Task::FinetuneHead => {
                let _ = seeds;
                Err(Unprepared::Upgrade(format!(
                    "this worker was built without the built-in training tasks (cargo feature `torch`), so it runs only task command, not `{}`",
                    lease.task
                )))
            }
            Task::Command => self.command_job(lease),
        }
    }

    /// The run of a `command` lease: its program resolved on this host and allowed by
    /// `--allow-command` (else it is this host's problem: the seed goes back uncounted), its
    /// arguments and environment with the run's seeds.
    fn command_job(&self, lease: &pb::Lease) -> Result<Job, Unprepared> {
        let c = lease.command.as_ref().ok_or_else(|| {
            Unprepared::Blamed(
                Blame::Configuration,
                "the lease carried no command settings".into(),
            )
        })?;
        let factors = lease_factors(lease);
        let value = seedsweep_core::spec::command::placeholder(
            lease.seed,
            [factors.init, factors.order, factors.augment, factors.split],
        );
        let expand = |text: &str| {
            seedsweep_core::spec::command::expand(text, &value)
                .map_err(|e| Unprepared::Blamed(Blame::Configuration, e))
        };
        let mut argv = c
            .argv
            .iter()
            .map(|a| expand(a))
            .collect::<Result<Vec<_>, _>>()?;
        let workdir = (!c.workdir.is_empty()).then(|| PathBuf::from(&c.workdir));
        let program = command::allowed(
            &argv[0],
            workdir.as_deref(),
            &self.settings.allowed_commands,
        )
        .map_err(|e| Unprepared::Blamed(Blame::Host, e))?;
        argv[0] = program.display().to_string();
        let checkpoints = self
            .settings
            .checkpoint_dir
            .as_ref()
            .map(|d| d.join(&lease.sweep_id).join(lease.seed.to_string()));
        let sweep_env = c
            .env
            .iter()
            .map(|(k, v)| Ok((k.clone(), expand(v)?)))
            .collect::<Result<Vec<_>, Unprepared>>()?;
        let run_env = command::seed_env(
            lease,
            &factors,
            checkpoints.as_deref(),
            self.settings.device,
        );
        // A guarded variable this worker does not allow is its own limit, as a program it
        // does not allow: the seed goes back uncounted for a worker that allows it.
        let env = (self.settings.env_policy)
            .build(std::env::vars(), &sweep_env, &run_env)
            .map_err(|e| Unprepared::Blamed(Blame::Host, e))?;
        Ok(Job::Command {
            run: command::CommandRun {
                argv,
                workdir,
                env,
                time_limit: (c.time_limit_seconds > 0)
                    .then(|| Duration::from_secs(c.time_limit_seconds)),
                log: self
                    .settings
                    .log_dir
                    .join(&lease.sweep_id)
                    .join(format!("{}-{}.log", lease.seed, lease.fence)),
                checkpoints,
                score: c.score.clone(),
                limits: command::contain::Limits {
                    memory_bytes: (c.memory_limit_mb > 0).then_some(c.memory_limit_mb << 20),
                    pids: (c.pids_limit > 0).then_some(u64::from(c.pids_limit)),
                },
            },
            epochs: (c.epochs > 0).then_some(c.epochs),
        })
    }

    /// Trains `job` on a blocking thread while its epochs stream to the coordinator; as the last
    /// epoch starts, leases the next seed, so the slot never waits for one.
    async fn train(
        self: &Arc<Self>,
        held: &Held,
        job: Job,
        seeds: Seeds,
    ) -> anyhow::Result<(Ran, Option<Held>)> {
        let (tx, rx) = mpsc::channel::<pb::EpochMetrics>(1024);
        let stream = tokio::spawn(ship_metrics(self.client.clone(), rx));
        let (prefetch_tx, prefetch_rx) = tokio::sync::oneshot::channel::<()>();
        let me = self.clone();
        let prefetch = tokio::spawn(async move {
            if prefetch_rx.await.is_err() || me.shutdown.load(Ordering::Relaxed) {
                return None;
            }
            match me.ask().await {
                Ok(Asked::Lease(h)) => Some(*h),
                _ => None,
            }
        });
        let images_per_epoch = job.images_per_epoch();
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let device = self.settings.device;
        let (stop, lref) = (held.stop.clone(), held.lref.clone());
        let epochs = job.epochs();
        let context = self.context();
        let trained = tokio::task::spawn_blocking(move || {
            let mut prefetch_tx = Some(prefetch_tx);
            if epochs <= 1 {
                prefetch_tx.take().map(|t| t.send(()));
            }
            let on_epoch = |m: &EpochMetrics| {
                if let Some(images) = images_per_epoch {
                    metrics.epoch(&lref.sweep_id, lref.seed, images, m.seconds);
                }
                if tx.blocking_send(epoch_pb(&lref, m)).is_err() {
                    // The coordinator closed the stream (a stale lease): stop training.
                    stop.store(true, Ordering::Relaxed);
                }
                if m.epoch + 1 >= epochs {
                    prefetch_tx.take().map(|t| t.send(()));
                }
            };
            let trained = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                job.run(seeds, device, &stop, &context, on_epoch)
            }));
            // tch panics on libtorch errors in operations it does not let fail: the seed fails
            // with libtorch's message, and the worker goes on.
            trained.unwrap_or_else(|panic| Err(TrainError::Panicked(panic_message(&panic))))
        })
        .await
        .context("the training thread panicked")?;
        let ran = Ran {
            seconds: started.elapsed().as_secs_f64(),
            trained,
            streamed: stream.await.context("the metrics stream task panicked")?,
            started,
        };
        let next = prefetch.await.context("the prefetch task panicked")?;
        Ok((ran, next))
    }

    fn context(&self) -> RunContext {
        RunContext {
            #[cfg(feature = "torch")]
            features: self.builtin.features.clone(),
        }
    }

    /// Tells the coordinator how the lease ended: its result, a failure (counted or not), or
    /// nothing when the lease was lost. The heartbeat goes on until then.
    async fn report(
        &self,
        held: &Held,
        ran: Ran,
        run: RunInfo,
        shown: &mut Shown<'_>,
    ) -> anyhow::Result<LeaseEnd> {
        let seed = held.lref.seed;
        if let Err(status) = &ran.streamed
            && is_lost(status)
        {
            tracing::warn!(
                seed,
                reason = status.message(),
                "lease lost while streaming metrics; dropping the seed"
            );
            held.settle();
            return Ok(LeaseEnd::Lost);
        }
        let e = match &ran.trained {
            Ok(t) => return self.complete(held, t, &ran, run, shown).await,
            Err(e) => e,
        };
        held.stop_heartbeat();
        match e.blame() {
            None if held.lost.load(Ordering::Relaxed) => {
                held.settle();
                tracing::warn!(seed, "lease lost during training; dropping the seed");
                Ok(LeaseEnd::Lost)
            }
            None => {
                self.hand_back(held, "current").await;
                Ok(LeaseEnd::ShutDown)
            }
            Some(blame) => {
                self.charge(held, blame, &e.to_string(), run.deterministic)
                    .await
            }
        }
    }

    /// Ends a failed attempt as its blame says: the host's problem hands the seed back uncounted
    /// and stops the worker (a broken host must not burn through a sweep's retries); the seed's
    /// or the configuration's counts, and the worker goes on. `deterministic`: the run repeats
    /// bit for bit; a problem of the configuration repeats anywhere, so counts as such.
    async fn charge(
        &self,
        held: &Held,
        blame: Blame,
        problem: &str,
        deterministic: bool,
    ) -> anyhow::Result<LeaseEnd> {
        if blame == Blame::Host {
            let cause = format!("worker {}: {problem}", self.settings.worker_id);
            self.fail(held, &cause, Charge::Uncounted).await?;
            bail!("{problem}");
        }
        let charge = Charge::Counted {
            deterministic: deterministic || blame == Blame::Configuration,
        };
        let state = self.fail(held, problem, charge).await?;
        tracing::warn!(seed = held.lref.seed, error = problem, state, "seed failed");
        Ok(LeaseEnd::Finished)
    }

    /// Spools a trained seed's result, then delivers it for as long as the coordinator is
    /// unreachable (the lease heartbeated meanwhile), replaying its epochs when the stream
    /// missed any.
    async fn complete(
        &self,
        held: &Held,
        t: &Trained,
        ran: &Ran,
        run: RunInfo,
        shown: &mut Shown<'_>,
    ) -> anyhow::Result<LeaseEnd> {
        let seed = held.lref.seed;
        let spooled = pb::SpooledResult {
            coordinator: self.settings.coordinator.url.clone(),
            epochs: t.history.iter().map(|m| epoch_pb(&held.lref, m)).collect(),
            result: Some(self.result_request(held, t, ran.seconds, run.fingerprint)?),
        };
        let path = match self.spool.put(&spooled) {
            Ok(path) => Some(path),
            Err(e) => {
                tracing::error!(seed, error = %e, "could not spool the result; delivering it without a copy on disk");
                None
            }
        };
        if let Err(s) = &ran.streamed {
            tracing::warn!(
                seed,
                error = s.message(),
                "the metrics stream missed epochs; replaying them with the result"
            );
        }
        let delivered = self.deliver(&spooled, ran.streamed.is_err()).await;
        held.stop_heartbeat();
        let delivered = match delivered {
            Ok(d) => d,
            Err(s) => bail!(
                "the coordinator refused the result of seed {seed} ({}); it stays in the spool",
                s.message()
            ),
        };
        // The coordinator knows what became of the seed, or the result waits in the spool for
        // the next start: either way the lease is not handed back.
        held.settle();
        let forget = |path: Option<PathBuf>| path.inspect(|p| self.spool.remove(p));
        match delivered {
            Delivery::Recorded => forget(path),
            Delivery::Refused(s) => {
                forget(path);
                tracing::warn!(seed, reason = s.message(), "result refused: lease lost");
                return Ok(LeaseEnd::Lost);
            }
            Delivery::Stopped => {
                tracing::info!(
                    seed,
                    "shutting down with the result in the spool; it is delivered at the next start"
                );
                return Ok(LeaseEnd::ShutDown);
            }
        };
        shown.finished_in = Some(ran.seconds);
        // The per-seed overhead: what is not training. The lease may have been prefetched, so
        // it counts from when training could start.
        let ready = held.leased_at.max(run.slot_free);
        let to_first_step = t
            .timing
            .first_step
            .map(|s| (ran.started.saturating_duration_since(ready)).as_secs_f64() + s);
        let after_last_step = t.timing.last_step.map(|at| at.elapsed().as_secs_f64());
        tracing::info!(
            seed,
            test_accuracy = spooled.result.as_ref().map(|r| r.test_accuracy),
            diverged_epoch = t.diverged,
            seconds = ran.seconds,
            resumed_from = t.resumed_from,
            lease_to_first_step_s = to_first_step,
            last_step_to_result_s = after_last_step,
            "seed finished"
        );
        if let Some(dir) = run.checkpoint_dir
            && let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %dir.display(), error = %e, "could not remove a checkpoint");
        }
        Ok(LeaseEnd::Finished)
    }

    /// Sends a spooled result (its epochs first when `replay`: re-recording an epoch is
    /// idempotent), retried with a bounded backoff for as long as the coordinator is
    /// unreachable: under the coordinator's outage rule the lease stays current meanwhile, and
    /// only the coordinator can say it is not. Gives up only on shutdown.
    async fn deliver(&self, spooled: &pb::SpooledResult, replay: bool) -> Result<Delivery, Status> {
        let mut delay = Duration::from_millis(200);
        loop {
            let mut c = self.client.clone();
            let sent = async {
                if replay {
                    c.stream_epoch_metrics(tokio_stream::iter(spooled.epochs.clone()))
                        .await?;
                }
                c.complete_seed(spooled.result.clone().unwrap_or_default())
                    .await
            };
            // A call that hangs (a coordinator that accepts and does not answer) must not keep
            // a stopping worker: the spool keeps the result for the next start.
            let sent = tokio::select! {
                sent = sent => sent,
                () = crate::lease::wait_for(&self.shutdown) => return Ok(Delivery::Stopped),
            };
            match sent {
                Ok(_) => return Ok(Delivery::Recorded),
                Err(s) if is_lost(&s) => return Ok(Delivery::Refused(s)),
                Err(s) if is_transient(&s) => {
                    if self.shutdown.load(Ordering::Relaxed) {
                        return Ok(Delivery::Stopped);
                    }
                    tracing::warn!(
                        error = s.message(),
                        "coordinator unreachable; will deliver the result when it is back"
                    );
                    sleep_unless(&self.shutdown, delay).await;
                    delay = (delay * 2).min(DELIVERY_BACKOFF);
                }
                Err(s) => return Err(s),
            }
        }
    }

    /// Delivers what the spool holds for this coordinator, one result at a time.
    async fn deliver_spooled(&self) -> anyhow::Result<()> {
        let url = &self.settings.coordinator.url;
        let waiting = self.spool.pending(url).with_context(|| {
            format!(
                "cannot read the spool {}",
                self.settings.spool_dir.display()
            )
        })?;
        for spooled in waiting {
            let seed = spooled
                .result
                .result
                .as_ref()
                .and_then(|r| r.lease.as_ref())
                .map(|l| l.seed);
            match self.deliver(&spooled.result, true).await? {
                Delivery::Recorded => {
                    tracing::info!(seed, "delivered a result from the spool");
                    self.spool.remove(&spooled.path);
                }
                Delivery::Refused(s) => {
                    tracing::warn!(
                        seed,
                        reason = s.message(),
                        "the coordinator refused a spooled result (its lease is no longer current); dropping it"
                    );
                    self.spool.remove(&spooled.path);
                }
                Delivery::Stopped => return Ok(()),
            }
        }
        Ok(())
    }

    /// The `CompleteSeed` request for a trained seed, from its last epoch.
    fn result_request(
        &self,
        held: &Held,
        t: &Trained,
        seconds: f64,
        fingerprint: String,
    ) -> anyhow::Result<pb::CompleteSeedRequest> {
        let last = t.history.last();
        if last.is_none() && t.diverged.is_none() {
            bail!("training ran no epoch");
        }
        let metric = |of: fn(&EpochMetrics) -> Option<f64>| last.and_then(of);
        let correct = (t.test_correct.as_ref())
            .filter(|c| c.examples <= seedsweep_core::domain::MAX_TEST_EXAMPLES);
        Ok(pb::CompleteSeedRequest {
            lease: Some(held.lref.clone()),
            worker_id: self.settings.worker_id.clone(),
            test_accuracy: metric(|m| m.test_accuracy),
            test_loss: metric(|m| m.test_loss),
            train_loss: metric(|m| m.train_loss),
            train_accuracy: metric(|m| m.train_accuracy),
            epochs: t.history.len() as u32,
            diverged_epoch: t.diverged,
            seconds,
            device: self.settings.device.label(),
            data_fingerprint: fingerprint,
            test_top5: metric(|m| m.test_top5),
            val_loss: metric(|m| m.val_loss),
            val_accuracy: metric(|m| m.val_accuracy),
            precision: t.precision.as_str().to_string(),
            deterministic: t.deterministic,
            // A test set past the coordinator's bound goes without per-example correctness.
            test_examples: correct.map_or(0, |c| c.examples),
            test_correct: correct.map(|c| c.bits.clone()).unwrap_or_default(),
            log: held.log.get().cloned().unwrap_or_default(),
            custom: (last.iter().flat_map(|m| &m.custom))
                .chain(&t.custom)
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
        })
    }

    /// Reports a failed or abandoned attempt (settling the lease); returns the seed's new state.
    async fn fail(&self, held: &Held, cause: &str, charge: Charge) -> anyhow::Result<String> {
        match self
            .handbacks
            .end(
                &held.lref,
                cause,
                charge,
                held.log.get().map_or("", String::as_str),
            )
            .await
        {
            Ok(state) => {
                held.settle();
                Ok(state)
            }
            Err(s) => bail!(
                "failed to report the failure of seed {}: {}",
                held.lref.seed,
                s.message()
            ),
        }
    }
}

/// A seed on the metrics page for as long as this lives (every way a lease ends drops it).
struct Shown<'a> {
    metrics: &'a WorkerMetrics,
    sweep: String,
    seed: i64,
    /// Set when the coordinator accepted the seed's result: its training time.
    finished_in: Option<f64>,
}

impl<'a> Shown<'a> {
    fn new(metrics: &'a WorkerMetrics, lease: &pb::LeaseRef) -> Self {
        metrics.started(&lease.sweep_id, lease.seed);
        Shown {
            metrics,
            sweep: lease.sweep_id.clone(),
            seed: lease.seed,
            finished_in: None,
        }
    }
}

impl Drop for Shown<'_> {
    fn drop(&mut self) {
        self.metrics.ended(&self.sweep, self.seed, self.finished_in);
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let text = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a panic without a message");
    // libtorch appends a C++ stack trace to its messages; the first lines say what happened.
    text.lines().take(3).collect::<Vec<_>>().join(" ")
}

// The test trains a built-in task's seed.
#[cfg(all(test, feature = "torch"))]
mod tests {
    use super::*;
    use crate::data;
    use pb::coordinator_server::{Coordinator, CoordinatorServer};
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use tonic::{Request, Response, Streaming};

    /// A test double of the coordinator: hands out its leases in turn, takes heartbeats and
    /// metrics, refuses every result (INVALID_ARGUMENT, so the worker stops with an error after
    /// training) and records every FailSeed.
    struct RefusesResults {
        leases: Mutex<VecDeque<pb::Lease>>,
        failed: Arc<Mutex<Vec<pb::FailSeedRequest>>>,
    }

    #[tonic::async_trait]
    impl Coordinator for RefusesResults {
        async fn lease_seed(
            &self,
            _: Request<pb::LeaseSeedRequest>,
        ) -> Result<Response<pb::LeaseSeedResponse>, Status> {
            use pb::lease_seed_response::Outcome;
            let outcome = match self.leases.lock().unwrap().pop_front() {
                Some(lease) => Outcome::Lease(lease),
                None => Outcome::NoWork(pb::NoWork { outstanding: 0 }),
            };
            Ok(Response::new(pb::LeaseSeedResponse {
                outcome: Some(outcome),
            }))
        }

        async fn heartbeat(
            &self,
            _: Request<pb::HeartbeatRequest>,
        ) -> Result<Response<pb::HeartbeatResponse>, Status> {
            Ok(Response::new(pb::HeartbeatResponse::default()))
        }

        async fn stream_epoch_metrics(
            &self,
            request: Request<Streaming<pb::EpochMetrics>>,
        ) -> Result<Response<pb::StreamEpochMetricsResponse>, Status> {
            let mut stream = request.into_inner();
            while stream.message().await?.is_some() {}
            Ok(Response::new(pb::StreamEpochMetricsResponse::default()))
        }

        async fn complete_seed(
            &self,
            _: Request<pb::CompleteSeedRequest>,
        ) -> Result<Response<pb::CompleteSeedResponse>, Status> {
            Err(Status::invalid_argument(
                "the test double refuses every result",
            ))
        }

        async fn fail_seed(
            &self,
            request: Request<pb::FailSeedRequest>,
        ) -> Result<Response<pb::FailSeedResponse>, Status> {
            self.failed.lock().unwrap().push(request.into_inner());
            Ok(Response::new(pb::FailSeedResponse {
                state: "pending".into(),
            }))
        }
    }

    fn tiny_lease(seed: i64) -> pb::Lease {
        pb::Lease {
            sweep_id: "00000000-0000-0000-0000-000000000001".into(),
            seed,
            fence: 1,
            task: "resnet9".into(),
            dataset: "tiny".into(),
            train: Some(pb::TrainConfig {
                epochs: 2,
                batch_size: 64,
                width: 0.125,
                lr: 0.2,
                lr_peak_epoch: 0.5,
                momentum: 0.9,
                model: "resnet9".into(),
                schedule: "linear".into(),
                precision: "fp32".into(),
                deterministic: true,
                ..Default::default()
            }),
            lease_ttl_seconds: 30,
            ..Default::default()
        }
    }

    /// A worker that stops with an error after training one seed (its result refused), while it
    /// holds the next seed it prefetched, hands both seeds back uncounted before it exits: the
    /// prefetched one was never trained, and the refused one's fate was never settled.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[expect(
        clippy::await_holding_lock,
        reason = "held for the whole test on purpose; no task of this test takes it"
    )]
    async fn an_error_hands_the_prefetched_lease_back_uncounted() {
        let _alone = crate::testing::alone();
        let data = tempfile::tempdir().unwrap();
        let (train, test) = data::synthetic_records(256, 128, 3);
        data::write_dataset(&data.path().join("tiny"), &train, &test).unwrap();
        let failed = Arc::new(Mutex::new(Vec::new()));
        let fake = RefusesResults {
            leases: Mutex::new([tiny_lease(1), tiny_lease(2)].into()),
            failed: failed.clone(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(CoordinatorServer::new(fake))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let settings = WorkerSettings {
            coordinator: Connection {
                url: format!("http://{addr}"),
                ..Default::default()
            },
            device: Device::Cpu,
            builtin: crate::builtin::Settings {
                data_dir: data.path().to_path_buf(),
                cifar10_url: String::new(),
                model_dir: data.path().to_path_buf(),
                feature_cache: data.path().join("features"),
                decode_threads: 1,
            },
            worker_id: "test-worker".into(),
            exit_when_idle: true,
            connect_timeout: Duration::from_secs(10),
            idle_poll: Duration::from_millis(100),
            max_seeds: None,
            lease_patience: Duration::from_secs(5),
            slots: 1,
            checkpoint_dir: None,
            spool_dir: data.path().join("spool"),
            allowed_commands: Vec::new(),
            allowed_programs: Vec::new(),
            log_dir: data.path().join("logs"),
            env_policy: Default::default(),
        };
        let shutdown = Arc::new(AtomicBool::new(false));
        let metrics = Arc::new(WorkerMetrics::default());
        let worker = Worker::connect(settings, shutdown, metrics)
            .await
            .unwrap()
            .expect("connected");
        let err = worker
            .run()
            .await
            .expect_err("a refused result stops the worker");
        assert!(err.to_string().contains("refuses every result"), "{err:#}");
        let failed = failed.lock().unwrap();
        let mut seeds: Vec<(i64, bool, &str)> = failed
            .iter()
            .map(|f| {
                (
                    f.lease.as_ref().unwrap().seed,
                    f.counts_as_attempt,
                    f.cause.as_str(),
                )
            })
            .collect();
        seeds.sort();
        let stopped = crate::lease::STOPPED;
        assert_eq!(
            seeds,
            [(1, false, stopped), (2, false, stopped)],
            "both seeds back, uncounted, once each"
        );
    }
}
